"""Several local tritonservers serving the same model, the scraper that reads their metrics pages as
the endpoint picker does, and the servers' own adapter cache counters."""
from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.scale_out.epp import Profile, ReplicaMetrics, extract
from multilora.launcher import TritonServer

CACHE_EVENTS = "lora_adapter_cache_events_total"  # docs/metrics.md: labels tier (host|device), event


@contextlib.contextmanager
def replicas(repo: Path, count: int, log_dir: Path, threads: int) -> Iterator[list[TritonServer]]:
    """`count` fresh tritonservers on `repo` (loopback, free ports), started side by side; each
    engine gets `threads` torch threads (OMP_NUM_THREADS), its share of the cores."""
    servers = [TritonServer(repo, log_path=log_dir / f"replica-{i}.log", exit_timeout_secs=3) for i in range(count)]
    for server in servers:
        server.env["OMP_NUM_THREADS"] = str(threads)
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(count) as pool:
            started = [pool.submit(server.start) for server in servers]
        for server, future in zip(servers, started):
            if future.exception() is None:
                stack.callback(server.stop)
        for future in started:
            future.result()  # raise the first start that failed, once the others are set to stop
        yield servers


def read_page(metrics_url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(metrics_url, timeout=timeout) as response:
        return response.read().decode()


def cache_events(metrics_url: str) -> dict[tuple[str, str], float]:
    """The server's adapter cache counters: (tier, event) -> count (docs/metrics.md)."""
    return {(s.labels["tier"], s.labels["event"]): s.value
            for family in text_string_to_metric_families(read_page(metrics_url))
            for s in family.samples if s.name == CACHE_EVENTS}


class Scraper:
    """Polls every replica's metrics page each `interval_s` on a thread of its own, as the EPP's
    metrics data source does (llm-d-router polls every 50 ms by default), and keeps the latest
    reading of each; a failed scrape keeps the previous one, as upstream does."""

    def __init__(self, metrics_urls: list[str], profile: Profile, interval_s: float) -> None:
        self.urls, self.profile, self.interval_s = metrics_urls, profile, interval_s
        self._latest = [ReplicaMetrics() for _ in metrics_urls]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.scrapes = self.failures = 0
        self.scrape_seconds = 0.0
        self._scrape()  # a first reading before any request is routed
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def latest(self) -> list[ReplicaMetrics]:
        with self._lock:
            return list(self._latest)

    def _scrape(self) -> None:
        started = time.perf_counter()
        for i, url in enumerate(self.urls):
            try:
                page = read_page(url, timeout=max(1.0, 10 * self.interval_s))
            except OSError:
                self.failures += 1
                continue
            with self._lock:
                self._latest[i] = extract(page, self.profile, self._latest[i])
        self.scrapes += 1
        self.scrape_seconds += time.perf_counter() - started

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))
            if not self._stop.is_set():
                self._scrape()
            next_at = max(next_at, time.monotonic() - self.interval_s)  # late: do not burst to catch up

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
