"""Issue 23, adapters: loads stalled on hung storage must not take the capacity of healthy ones
(item 4), and the host tier must notice an adapter deleted or replaced on disk (item 7). Bounded in
time; no server needed."""
from __future__ import annotations

import dataclasses
import shutil
import threading
import time

import pytest

from engine_kit import make_engine, req
from multilora.adapters import files as adapter_files
from multilora.engine.sequence import FinishReason


@pytest.fixture
def adapters(demo_dir, tmp_path):
    folder = tmp_path / "adapters"
    shutil.copytree(demo_dir / "adapters", folder)
    return folder


def _first_outputs(engine, requests, wanted, timeout):
    """Add requests to a running engine; {request id: (first output, seconds until it)}, once every
    id in `wanted` has one or `timeout` passes."""
    first, started = {}, time.monotonic()
    arrived = threading.Event()

    def on_output(out):
        if out.request_id not in first:
            first[out.request_id] = (out, time.monotonic() - started)
            if wanted <= set(first):
                arrived.set()

    for request in requests:
        engine.add_request(request, on_output)
    arrived.wait(timeout)
    return first


def test_stalled_loads_leave_room_for_a_healthy_cold_adapter(demo_dir, adapters, monkeypatch):
    """Item 4: five adapters whose weights hang on read took every load thread (max_adapter_loads 4)
    until adapter_load_timeout_s (60 s), and an ordinary cold adapter waited 57.8 s for them. With
    the default settings its first token now comes within seconds, while the reads still hang."""
    for i in range(5):
        shutil.copytree(adapters / "sql", adapters / f"stall{i}")
    release = threading.Event()
    real_read = adapter_files.read_file

    def read(adapter_id, path, root, max_bytes):
        if adapter_id.startswith("stall") and path.name == adapter_files.WEIGHTS_FILE:
            release.wait(120)  # hung storage: longer than the whole test
        return real_read(adapter_id, path, root, max_bytes)

    monkeypatch.setattr(adapter_files, "read_file", read)
    engine = make_engine(demo_dir, adapter_dir=str(adapters))
    assert engine.config.adapter_load_timeout_s == 60 and engine.config.max_adapter_loads == 4
    engine.start()
    try:
        stalled = [req(f"s{i}", f"stall{i}", max_tokens=2) for i in range(5)]
        healthy = dataclasses.replace(req("healthy", "chat", max_tokens=2, ignore_eos=True), stream=True)
        first = _first_outputs(engine, stalled + [healthy],
                               {"healthy"}, timeout=20)
        assert not {f"s{i}" for i in range(5)} & set(first)  # still stalled: the test holds them
    finally:
        release.set()
        engine.shutdown()
    assert "healthy" in first, "the healthy cold adapter got no token within 20 s"
    out, seconds = first["healthy"]
    assert out.error is None and out.text
    assert seconds < 10.0


def test_a_deleted_adapter_is_no_longer_served_nor_listed(demo_dir, adapters):
    """Item 7: with the default `management: read` nobody can unload, and a deleted adapter was
    served from memory and listed until a restart."""
    engine = make_engine(demo_dir, adapter_dir=str(adapters))
    served = engine.generate([req("before", "sql", max_tokens=3)])["before"][-1]
    assert served.error is None and "sql" in engine.manage("list")["host"]
    shutil.rmtree(adapters / "sql")
    time.sleep(1.2)  # the files are looked at once a second at most (adapter_check_interval_s)
    out = engine.generate([req("after", "sql", max_tokens=3)])["after"][-1]
    assert out.finish_reason is FinishReason.ERROR and "unknown adapter 'sql'" in str(out.error)
    listing = engine.manage("list")
    assert all("sql" not in listing[tier] for tier in ("disk", "host", "loading", "device")), listing
    assert engine.generate([req("other", "chat", max_tokens=3)])["other"][-1].error is None


def test_a_replaced_adapter_is_reloaded_for_new_requests(demo_dir, adapters):
    """Item 7: new weights in a served adapter's folder reach the next request (after at most
    adapter_check_interval_s); the greedy tokens are those of a fresh engine on the new files."""
    fresh = make_engine(demo_dir).generate([req("chat", "chat", max_tokens=12, ignore_eos=True)])["chat"][-1].text
    engine = make_engine(demo_dir, adapter_dir=str(adapters))
    before = engine.generate([req("before", "sql", max_tokens=12, ignore_eos=True)])["before"][-1].text
    assert before != fresh
    for name in (adapter_files.CONFIG_FILE, adapter_files.WEIGHTS_FILE):
        shutil.copy(adapters / "chat" / name, adapters / "sql" / f".{name}.new")
        (adapters / "sql" / f".{name}.new").replace(adapters / "sql" / name)  # how a deploy swaps files
    time.sleep(1.2)
    after = engine.generate([req(f"after{i}", "sql", max_tokens=12, ignore_eos=True) for i in range(3)])
    assert {out[-1].text for out in after.values()} == {fresh}
