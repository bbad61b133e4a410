"""One owner for engine state: management commands from several threads while mixed-adapter
traffic runs change nothing but what they should (issue 12 §2)."""
from __future__ import annotations

import random
import threading
import time

from engine_kit import make_engine, req

ADAPTERS = [None, "sql", "chat", "summarize", "acme/translate"]


def test_list_load_unload_from_many_threads_during_traffic(demo_dir):
    requests = [req(f"r{i}", ADAPTERS[i % len(ADAPTERS)], max_tokens=6, ignore_eos=True,
                    prompt=["SELECT name FROM orders", "Translate to French: good morning"][i % 2]) for i in range(40)]
    expected = {rid: outs[-1].text for rid, outs in make_engine(demo_dir).generate(requests).items()}

    engine = make_engine(demo_dir, max_loras=2, max_cpu_loras=2, max_num_seqs=8)
    engine.start()
    finals: dict[str, list] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def on_output(out):
        if out.finished:
            with lock:
                finals.setdefault(out.request_id, []).append(out)

    def hammer(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            command = rng.choice(["list", "load", "unload"])
            adapter = None if command == "list" else rng.choice(ADAPTERS[1:])
            try:
                answer = engine.manage(command, adapter, timeout=30)
                assert isinstance(answer, dict)
            except BaseException as exc:  # reported below
                errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    try:
        for request in requests:
            engine.add_request(request, on_output)
            time.sleep(0.01)
        deadline = time.monotonic() + 120
        while len(finals) < len(requests) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        engine.shutdown()
    assert not errors, errors[:3]
    assert sorted(finals) == sorted(expected)
    assert all(len(outs) == 1 and outs[0].error is None for outs in finals.values())
    assert {rid: outs[0].text for rid, outs in finals.items()} == expected
    assert engine.kv_cache.num_free == engine.kv_cache.num_blocks
