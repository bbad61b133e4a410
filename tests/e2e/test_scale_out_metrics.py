"""What a load balancer (the Gateway API Inference Extension's endpoint picker) reads from the real
tritonserver's metrics port: the protocol gauges tell the truth under load, and clients sending
adapter ids that do not exist cannot grow the page or the process. docs/metrics.md lists them."""
from __future__ import annotations

import queue
import random
import shutil
import string
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from multilora.launcher import TritonServer
from multilora.launcher.processes import STUB_COMM, children
from serving_kit import copy_lora_repo

from .test_serving import PROMPT, generate

pytestmark = pytest.mark.e2e
ADAPTERS = ["a1", "a2", "a3", "a4", "a5"]
SLOTS = 3  # max_num_seqs and max_loras: three of the five requests run, two wait
SCRAPE_INTERVAL_S = 1.0  # a slow endpoint picker's; the default (llm-d-router 0.10) polls every 50 ms


@pytest.fixture(scope="module")
def server(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    adapters = tmp_path_factory.mktemp("adapters")
    for name in ADAPTERS:
        shutil.copytree(demo_dir / "adapters" / "sql", adapters / name)
    repo = copy_lora_repo(tmp_path_factory.mktemp("model_repository"), demo_dir, adapter_dir=str(adapters),
                          max_num_seqs=str(SLOTS), max_loras=str(SLOTS), max_cpu_loras="8",
                          adapter_loads_per_s="0")  # unknown ids each start a (failing) load: unthrottled here
    log = tmp_path_factory.mktemp("server") / "tritonserver.log"
    with TritonServer(repo, log_path=log, exit_timeout_secs=3) as running:
        yield running


def scrape(server) -> tuple[str, dict[tuple[str, frozenset], float]]:
    """The page, and its samples as prometheus_client's parser reads them: (name, labels) -> value."""
    page = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return page, {(s.name, frozenset(s.labels.items())): s.value
                  for family in text_string_to_metric_families(page) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: dict, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


def adapter_lists(samples: dict) -> tuple[set[str], set[str], str]:
    (info,) = series(samples, "lora_requests_info")  # one series: stale label sets leave the page
    running, waiting = info["running_lora_adapters"], info["waiting_lora_adapters"]
    return set(filter(None, running.split(","))), set(filter(None, waiting.split(","))), info["max_lora"]


def stream_requests(server, adapters: list[str], max_tokens: int) -> tuple[grpcclient.InferenceServerClient,
                                                                         dict[str, int], queue.Queue]:
    """One gRPC stream, a streaming request per adapter (request id = adapter); returns the client,
    tokens received so far per adapter, and a queue of the adapters whose final response came."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    received = {a: 0 for a in adapters}
    finished: queue.Queue = queue.Queue()

    def on_response(result, error):
        assert error is None, error
        response = result.get_response()
        received[response.id] += 1
        if response.parameters["triton_final_response"].bool_param:
            finished.put(response.id)

    client.start_stream(callback=on_response)
    for adapter in adapters:
        inputs = []
        for name, data, dtype in [("text_input", np.array([[PROMPT.encode()]], dtype=np.object_), "BYTES"),
                                  ("adapter_id", np.array([[adapter.encode()]], dtype=np.object_), "BYTES"),
                                  ("max_tokens", np.array([[max_tokens]], dtype=np.int64), "INT64"),
                                  ("ignore_eos", np.array([[True]]), "BOOL"), ("stream", np.array([[True]]), "BOOL")]:
            tensor = grpcclient.InferInput(name, [1, 1], dtype)
            tensor.set_data_from_numpy(data)
            inputs.append(tensor)
        client.async_stream_infer("lora_llm", inputs, request_id=adapter)
    return client, received, finished


def test_running_and_waiting_adapters_match_under_load_and_empty_after(server):
    for adapter in ADAPTERS:  # loaded first, so admission follows arrival order, not load times
        assert generate(server, {"adapter_command": "load", "adapter_id": adapter}, prompt=None)[0] == 200
    client, received, finished = stream_requests(server, ADAPTERS, max_tokens=400)
    deadline = time.monotonic() + 120
    while sum(n > 0 for n in received.values()) < SLOTS and time.monotonic() < deadline:
        time.sleep(0.005)
    started = {a for a, n in received.items() if n > 0}
    _, samples = scrape(server)
    while value(samples, "lora_scheduler_state", state="waiting") < len(ADAPTERS) - SLOTS \
            and time.monotonic() < deadline:  # the last two may still be on their way through Triton
        time.sleep(0.05)
        _, samples = scrape(server)
    assert len(started) == SLOTS and finished.empty(), "three run, none has ended yet"
    running, waiting, max_lora = adapter_lists(samples)
    assert running == started and waiting == set(ADAPTERS) - started and max_lora == str(SLOTS)
    assert value(samples, "lora_scheduler_state", state="running") == SLOTS
    assert value(samples, "lora_scheduler_state", state="waiting") == len(ADAPTERS) - SLOTS
    assert 0 < value(samples, "lora_kv_cache_usage") <= 1
    pinned = {s["adapter"] for s in series(samples, "lora_adapter_residency")
              if s["tier"] == "device" and s["pinned"] == "true"}
    assert pinned == started
    assert value(samples, "lora_adapter_capacity", tier="device") == SLOTS
    assert value(samples, "lora_adapters_pinned", tier="device") == SLOTS

    done = {finished.get(timeout=300) for _ in ADAPTERS}
    ended = time.monotonic()
    assert done == set(ADAPTERS) and all(n > 1 for n in received.values())
    while True:  # the engine publishes in the step that ended them; the sender may answer first
        _, samples = scrape(server)
        if adapter_lists(samples)[:2] == (set(), set()) or time.monotonic() - ended > SCRAPE_INTERVAL_S:
            break
        time.sleep(0.01)
    assert adapter_lists(samples) == (set(), set(), str(SLOTS)), "empty within one scrape interval"
    assert value(samples, "lora_scheduler_state", state="running") == 0
    assert value(samples, "lora_scheduler_state", state="waiting") == 0
    assert value(samples, "lora_kv_cache_usage") == 0
    assert value(samples, "lora_adapters_pinned", tier="device") == 0
    client.stop_stream()
    client.close()


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def send_unknown(server, count: int, rng: random.Random) -> None:
    ids = ["".join(rng.choices(string.ascii_lowercase + string.digits, k=16)) for _ in range(count)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda a: generate(server, {"adapter_id": a, "max_tokens": 1}), ids))
    assert all(status == 400 and "unknown adapter" in body["error"] for status, body in answers)


def test_random_unknown_adapter_ids_add_no_series(server):
    rng = random.Random(21)
    send_unknown(server, 500, rng)  # warm: the __unknown__ series, the load threads' malloc arenas
    (stub,) = [p.pid for p in children(server.process.pid) if p.comm == STUB_COMM]
    processes = {"tritonserver": server.process.pid, "stub": stub}
    page, before = scrape(server)
    rss = {name: rss_kib(pid) for name, pid in processes.items()}
    send_unknown(server, 10_000, rng)
    page_after, after = scrape(server)
    assert after.keys() == before.keys(), "no series added or removed"
    assert value(after, "lora_requests_total", adapter="__unknown__") - \
        value(before, "lora_requests_total", adapter="__unknown__") == 10_000
    # Only counters' digits may grow (measured: +18 bytes). Before the bound the same run added
    # 20,000 lines: the page went from 58 KB to 1.1 MB.
    assert len(page_after) - len(page) < 200
    for name, pid in processes.items():
        grown = rss_kib(pid) - rss[name]
        # Tolerance 4 MiB: measured here +1.6 MiB (tritonserver) and +0.9 MiB (stub), memory malloc
        # keeps after the requests' and load threads' allocations; before the bound the same run
        # grew tritonserver by 14 MiB and the stub by 23 MiB.
        assert grown < 4096, f"{name} grew by {grown} KiB over 10,000 unknown ids"
