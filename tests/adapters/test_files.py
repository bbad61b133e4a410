import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from multilora.adapters.files import load_adapter
from multilora.adapters.hub import hub_adapter_folder, split_hub_id
from multilora.adapters.ids import adapter_folder, check_adapter_id, folder_inside, list_local_adapters
from multilora.errors import AdapterLoadError, AdapterNotFoundError, InvalidParameterError
from multilora.hub_ids import is_hub_id
from multilora.models.families import LoraTargetShape

_SIZES = {"q_proj": (128, 128), "k_proj": (128, 64), "v_proj": (128, 64), "o_proj": (128, 128),
          "gate_proj": (128, 344), "up_proj": (128, 344), "down_proj": (344, 128)}
SHAPES = {name: LoraTargetShape(f"{'mlp' if name in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{name}",
                                h_in, h_out) for name, (h_in, h_out) in _SIZES.items()}


@pytest.fixture
def adapter(demo_dir, tmp_path):
    """A writable copy of the demo's 'sql' adapter (rank 8, q/v, alpha 16)."""
    folder = tmp_path / "sql"
    shutil.copytree(demo_dir / "adapters" / "sql", folder)
    return folder


def load(folder, max_rank=64, root=None):
    return load_adapter("sql", folder, SHAPES, num_layers=4, max_rank=max_rank, dtype=torch.float32, root=root)


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_weights_are_transposed_with_peft_scale_folded_in(adapter):
    loaded = load(adapter)
    raw = load_file(adapter / "adapter_model.safetensors")
    a, b = loaded.weights[(2, "v_proj")]
    prefix = "base_model.model.model.layers.2.self_attn.v_proj"
    torch.testing.assert_close(a, raw[f"{prefix}.lora_A.weight"].t())
    torch.testing.assert_close(b, raw[f"{prefix}.lora_B.weight"].t() * (16 / 8))
    assert set(p for _, p in loaded.weights) == {"q_proj", "v_proj"} and loaded.ranks == {8}


def test_rslora_scale(adapter):
    edit_config(adapter, use_rslora=True)
    raw = load_file(adapter / "adapter_model.safetensors")
    _, b = load(adapter).weights[(0, "q_proj")]
    expected = raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].t() * (16 / math.sqrt(8))
    torch.testing.assert_close(b, expected)


@pytest.mark.parametrize("change, needle", [
    ({"use_dora": True}, "use_dora (DoRA) is not supported"),
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"lora_alpha": -1}, "'lora_alpha'"),
])
def test_unsupported_configs_are_refused_by_name(adapter, change, needle):
    edit_config(adapter, **change)
    with pytest.raises(AdapterLoadError, match="adapter 'sql'") as err:
        load(adapter)
    assert needle in str(err.value)


def test_shape_mismatch_names_layer_and_shapes(adapter):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(8, 4096)
    save_file(tensors, path)
    with pytest.raises(AdapterLoadError, match=r"layers\.1\.q_proj.*\(8, 4096\).*expected \(8, 128\)"):
        load(adapter)


def test_extra_layer_unsupported_module_and_rank_cap(adapter):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({**tensors, "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(8, 128),
               "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(128, 8)}, path)
    with pytest.raises(AdapterLoadError, match="layer 9.*4 layers"):
        load(adapter)
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 128)}, path)
    with pytest.raises(AdapterLoadError, match="lm_head.*not a LoRA A/B weight"):
        load(adapter)
    save_file(tensors, path)
    with pytest.raises(AdapterLoadError, match="rank 8 .*above max_lora_rank 4"):
        load(adapter, max_rank=4)


def test_missing_truncated_and_bad_json_files(adapter):
    (adapter / "adapter_config.json").write_text("{oops")
    with pytest.raises(AdapterLoadError, match="adapter_config.json is not valid JSON"):
        load(adapter)
    (adapter / "adapter_config.json").write_text("{}")
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[:100])
    with pytest.raises(AdapterLoadError, match="unreadable or truncated"):
        load(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterLoadError, match="missing.*only the safetensors format"):
        load(adapter)


def test_ids_resolve_inside_adapter_dir_only(demo_dir, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(demo_dir / "adapters", root)
    assert adapter_folder(root, "acme/translate") == (root / "acme" / "translate").resolve()
    assert {"sql", "chat", "summarize", "acme/translate"} <= set(list_local_adapters(root))
    (root / "out").symlink_to(demo_dir / "adapters" / "sql")
    with pytest.raises(InvalidParameterError, match="outside adapter_dir"):
        adapter_folder(root, "out")
    assert "out" not in list_local_adapters(root)
    for bad in ["..", "../sql", "/etc", "a/../../b", "sql\n", "-x", "a\\b"]:
        with pytest.raises(InvalidParameterError, match="not a valid adapter id"):
            adapter_folder(root, bad)
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'nope'"):
        adapter_folder(root, "nope")


@pytest.mark.parametrize("value, adapter, hub", [
    ("sql", True, False), ("acme/translate", True, True), ("acme/sql@v1.2", True, True),
    ("meta-llama/Llama-3.1-8B-Instruct", True, True), ("a_b/c-d.e@main", True, True),
    ("sql@v1", False, False), ("acme/sql@", False, False), ("acme/sql@refs/pr/1", False, False),
    ("a/b/c", False, False), ("acme/../etc", False, False), ("a..b", False, False), ("/abs/path", False, False),
    ("./local", False, False), ("-x/y", False, False), ("x" * 97, False, False), ("ünïcode/x", False, False),
])
def test_one_grammar_for_adapter_and_hub_ids(value, adapter, hub):
    """hub_ids is the one grammar: the parser, the store, the Hub fetcher and config.py's base_model use it."""
    assert is_hub_id(value) is hub
    if adapter:
        assert check_adapter_id(value) == value
    else:
        with pytest.raises(InvalidParameterError, match="not a valid adapter id"):
            check_adapter_id(value)
    if hub:
        repo, _, revision = value.partition("@")
        assert split_hub_id(value) == (repo, revision or None)


def test_local_and_hub_folders_share_one_containment_check(tmp_path):
    root, outside = tmp_path / "adapters", tmp_path / "outside"
    (outside / "sql").mkdir(parents=True)
    (outside / "sql" / "adapter_config.json").write_text("{}")
    root.mkdir()
    (root / "acme").symlink_to(outside, target_is_directory=True)  # an org folder that leads elsewhere
    for where in (adapter_folder, hub_adapter_folder, folder_inside):
        with pytest.raises(InvalidParameterError, match="'acme/sql' points outside adapter_dir"):
            where(root, "acme/sql")
    assert list_local_adapters(root) == []
    (root / "inside").mkdir()
    assert folder_inside(root, "inside") == (root / "inside").resolve()


def test_an_adapter_is_one_allocation(adapter):
    loaded = load(adapter)
    storages = {t.untyped_storage().data_ptr() for pair in loaded.weights.values() for t in pair}
    assert len(storages) == 1
    first = next(iter(loaded.weights.values()))[0]
    assert first.untyped_storage().nbytes() == loaded.nbytes
    assert loaded.to(torch.device("cpu")) is loaded


def test_files_that_resolve_outside_adapter_dir_are_refused(adapter, tmp_path):
    """Issue 10 item 9: a symlinked file inside an adapter folder must not be read from outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "adapter_config.json"
    secret.write_text('{"r": "SECRET-VALUE"}')
    config = adapter / "adapter_config.json"
    config.unlink()
    config.symlink_to(secret)
    with pytest.raises(AdapterLoadError, match="adapter_config.json resolves outside adapter_dir") as err:
        load(adapter, root=adapter)
    assert "SECRET" not in str(err.value)
    config.unlink()
    config.write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    weights = adapter / "adapter_model.safetensors"
    weights.rename(outside / "weights.safetensors")
    weights.symlink_to(outside / "weights.safetensors")
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors resolves outside adapter_dir"):
        load(adapter, root=adapter)
    assert load(adapter, root=tmp_path).ranks == {8}  # inside the root the link is fine


def test_only_regular_files_are_read(adapter):
    """A FIFO (or a device node) would block or never end: refused before it is opened."""
    import os

    weights = adapter / "adapter_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors is not a regular file"):
        load(adapter)
