"""A test copy of the shipped lora_llm model, serving the tiny demo (tests/conftest.py's demo_dir)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_PARAMETERS = {
    "base_model": "demo/base",  # the shipped config serves the real demo
    "device": "cpu",  # fp32 CPU answers, as the in-process references compute them
    "management": "on",  # the tests load and unload adapters
}
# A management token for servers that require one (management_token_env=TOKEN_VARIABLE).
TOKEN_VARIABLE, TOKEN = "MULTILORA_TEST_MANAGEMENT_TOKEN", "s3cret-token"


def copy_lora_repo(dest: Path, demo_dir: Path, **parameters: str) -> Path:
    """dest/lora_llm: the shipped model folder with `demo` linked to the tiny demo, and the shipped
    config.pbtxt with TEST_PARAMETERS and `parameters` set; returns dest (a model repository)."""
    model = dest / "lora_llm"
    shutil.copytree(REPO_ROOT / "model_repository" / "lora_llm", model,
                    ignore=shutil.ignore_patterns("demo", "__pycache__"))
    (model / "demo").symlink_to(demo_dir, target_is_directory=True)
    config = model / "config.pbtxt"
    text = config.read_text()
    for key, value in {**TEST_PARAMETERS, **parameters}.items():
        line = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        text, found = re.subn(rf'parameters \{{ key: "{key}" value: \{{ string_value: "[^"]*" \}} \}}', line, text)
        if not found:
            text += line + "\n"
    config.write_text(text)
    return dest
