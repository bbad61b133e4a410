"""Adapters saved as they are shipped: peft's own files, naming their base model, not a build path."""
from __future__ import annotations

import json
from pathlib import Path


def save_adapter(peft_model, out: Path, base_name: str) -> Path:
    """Save with peft, then name the base model `base_name` in adapter_config.json.

    peft saves while the config still holds the base's local path, so it reads the base's config from
    that folder instead of looking the name up on the Hub.
    """
    peft_model.save_pretrained(out, safe_serialization=True)
    config_path = out / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = base_name  # the engine compares this with its base model's folder name
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    return out
