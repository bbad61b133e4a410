"""Adapter management: PEFT files and their checks, ids, the Hub, the host tier and the device slots.

The LoRA compute that uses the adapters' weights is in `multilora.lora`.
"""
