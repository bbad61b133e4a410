"""One real tritonserver for the whole e2e run, serving the repository's lora_llm model on the tiny
demo checkpoint, plus adapters that are broken on purpose (the real demo: test_real_demo.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from multilora.config import EngineConfig
from multilora.engine.llm_engine import LLMEngine
from multilora.launcher import TritonServer
from serving_kit import copy_lora_repo

REPO_ROOT = Path(__file__).resolve().parents[2]


def add_broken_adapters(adapters: Path, outside: Path) -> None:
    """mismatch: shapes of another base model; truncated: cut file; badjson: unparsable config;
    rank128: above max_lora_rank; embed: an embedding LoRA; escape: symlink out of adapter_dir."""
    good = adapters / "sql"
    mismatch = adapters / "mismatch"
    shutil.copytree(good, mismatch, dirs_exist_ok=True)
    tensors = load_file(good / "adapter_model.safetensors")
    tensors = {k: torch.zeros(v.shape[0], 96) if "lora_A" in k else v for k, v in tensors.items()}
    save_file(tensors, mismatch / "adapter_model.safetensors")
    truncated = adapters / "truncated"
    shutil.copytree(good, truncated, dirs_exist_ok=True)
    data = (good / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bad_json = adapters / "badjson"
    shutil.copytree(good, bad_json, dirs_exist_ok=True)
    (bad_json / "adapter_config.json").write_text("{not json")
    high_rank = adapters / "rank128"
    shutil.copytree(good, high_rank, dirs_exist_ok=True)
    save_file({k: torch.zeros(128, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 128)
               for k, v in load_file(good / "adapter_model.safetensors").items()},
              high_rank / "adapter_model.safetensors")
    embed = adapters / "embed"
    shutil.copytree(good, embed, dirs_exist_ok=True)
    save_file({**load_file(good / "adapter_model.safetensors"),
               "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 1024)},
              embed / "adapter_model.safetensors")
    shutil.copytree(good, outside / "secret", dirs_exist_ok=True)
    escape = adapters / "escape"
    if not escape.exists():
        escape.symlink_to(outside / "secret", target_is_directory=True)


@pytest.fixture(scope="session")
def served_demo(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared server's copy of the tiny demo, which the reference engine reads too: tests add
    adapters to it (the broken ones here, test_gateway.py's templated ones) that the tests using
    demo_dir must not see, whichever order or xdist worker they run in."""
    own = tmp_path_factory.mktemp("served_demo")
    shutil.copytree(demo_dir, own, dirs_exist_ok=True)
    add_broken_adapters(own / "adapters", tmp_path_factory.mktemp("outside"))
    return own


@pytest.fixture(scope="session")
def model_repo(served_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_lora_repo(tmp_path_factory.mktemp("model_repository"), served_demo)


@pytest.fixture(scope="session")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server") / "tritonserver.log"
    with TritonServer(model_repo, log_path=log, exit_timeout_secs=3) as running:
        yield running


@pytest.fixture(scope="session")
def reference_engine(served_demo: Path) -> LLMEngine:
    """The engine in this process, on the same files: what the server must answer."""
    return LLMEngine(EngineConfig(base_model=str(served_demo / "base"), adapter_dir=str(served_demo / "adapters"),
                                  kv_cache_memory="32MiB"))
