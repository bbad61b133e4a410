"""The real demo's build is cached by a fingerprint in READY, and touches only its own files."""
from __future__ import annotations

import pytest

from multilora.demo import build, smollm2


def fake_build(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def convert(out):
        calls.append("convert")
        out.mkdir()
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(smollm2, "convert", convert)
    monkeypatch.setattr(build, "train_adapters", lambda base, out, settings: calls.append(f"train from {base.name}"))
    return calls


def test_a_build_with_this_fingerprint_is_not_redone(tmp_path, monkeypatch):
    calls = fake_build(monkeypatch)
    (tmp_path / build.READY).write_text(f"{build.fingerprint()}\nbuilt in 120 s\n")
    assert build.is_built(tmp_path)
    build.build_demo(tmp_path, log=lambda line: None)
    assert calls == []


def test_a_stale_build_is_replaced_and_nothing_else_in_the_folder_is_touched(tmp_path, monkeypatch):
    calls = fake_build(monkeypatch)
    (tmp_path / build.READY).write_text("0123456789abcdef\n")
    (tmp_path / smollm2.MODEL_NAME).mkdir()
    (tmp_path / smollm2.MODEL_NAME / "old.safetensors").write_text("stale")
    (tmp_path / build.ADAPTER_DIR / "old").mkdir(parents=True)
    (tmp_path / "base").mkdir()  # the random demo this folder held before
    (tmp_path / "notes.txt").write_text("mine")
    assert not build.is_built(tmp_path)
    build.build_demo(tmp_path, log=lambda line: None)
    assert calls == ["convert", f"train from {smollm2.MODEL_NAME}"]
    assert not (tmp_path / smollm2.MODEL_NAME / "old.safetensors").exists()
    assert not (tmp_path / build.ADAPTER_DIR / "old").exists() and not (tmp_path / "base").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert build.is_built(tmp_path)


def test_the_fingerprint_follows_the_training_code(monkeypatch, tmp_path):
    before = build.fingerprint()
    assert build.fingerprint() == before  # the same files and packages: the same build
    changed = tmp_path / "train.py"
    changed.write_bytes(open(build.train.__file__, "rb").read() + b"# another recipe\n")
    monkeypatch.setattr(build.train, "__file__", str(changed))
    assert build.fingerprint() != before


def test_the_fingerprint_follows_the_installed_packages(monkeypatch):
    before = build.fingerprint()
    real_version = build.importlib.metadata.version
    monkeypatch.setattr(build.importlib.metadata, "version",
                        lambda name: "0.0.1" if name == "transformers" else real_version(name))
    assert build.fingerprint() != before


def test_a_missing_model_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="requirements-demo.txt"):
        smollm2.gguf_path()
