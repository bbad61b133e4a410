"""LoRA compute: the layers, the step plan, the weight tables and the backends that apply them.

Adapter management (files, ids, the Hub, the host tier, the device slots) is in `multilora.adapters`.
"""
