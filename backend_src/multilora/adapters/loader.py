"""Adapter loads off the engine thread: each in a thread of its own, limited in rate and number.

A load reads files (see files.py: plain reads that release the interpreter while they wait),
so a load stalled on hung storage blocks only its own thread; the engine gives up on it after
`adapter_load_timeout_s` and abandons it, which frees its place for other loads (the thread stays
parked in its system call until the read returns). Loads start at most `max_concurrent` at a time
and at most `per_second` per second (a token bucket), so one client cycling through cold adapters
cannot take the machine from the requests of resident ones. Started and abandoned only by the
engine thread; the load threads only compute and complete their Future.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

from .files import LoraAdapter

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Load:
    adapter_id: str
    future: Future = field(default_factory=Future)
    started: float | None = None  # monotonic time its thread started; None while queued


class AdapterLoader:
    def __init__(self, load: Callable[[str], LoraAdapter], max_concurrent: int, per_second: float,
                 on_done: Callable[[], None] = lambda: None) -> None:
        self._load = load
        self.max_concurrent = max_concurrent
        self.per_second = per_second
        self._on_done = on_done  # wakes the engine loop
        self._queue: deque[Load] = deque()
        self._running: set[Load] = set()
        self._tokens = float(max_concurrent)
        self._refilled = time.monotonic()
        self._blocked: set[Load] = set()  # abandoned loads whose thread has not returned yet

    def submit(self, adapter_id: str) -> Load:
        load = Load(adapter_id)
        self._queue.append(load)
        self.dispatch()
        return load

    def dispatch(self) -> None:
        """Start queued loads as far as the limits allow; the engine calls it every step."""
        now = time.monotonic()
        if self.per_second > 0:
            self._tokens = min(float(self.max_concurrent),
                               self._tokens + (now - self._refilled) * self.per_second)
        self._refilled = now
        self._running = {load for load in self._running if not load.future.done()}
        while self._queue and len(self._running) < self.max_concurrent and (
                self.per_second <= 0 or self._tokens >= 1.0):
            load = self._queue.popleft()
            if load.future.done():  # abandoned while queued
                continue
            self._tokens -= 1.0
            load.started = now
            self._running.add(load)
            threading.Thread(target=self._run, args=(load,), name=f"adapter-load:{load.adapter_id}",
                             daemon=True).start()

    def abandon(self, load: Load, error: Exception) -> None:
        """Give up on a load (timeout): its requests fail now; a late result is dropped."""
        if not _complete(load.future, exception=error):
            return  # it finished first
        self._running.discard(load)
        if load.started is not None:
            self._blocked.add(load)
            log.error("adapter '%s': load abandoned after %.1f s (%s); %d load thread(s) still blocked",
                      load.adapter_id, time.monotonic() - load.started, error, self.blocked)

    @property
    def blocked(self) -> int:
        """Abandoned loads whose thread is still waiting (e.g. on hung storage)."""
        return len(self._blocked)

    def _run(self, load: Load) -> None:
        try:
            result = self._load(load.adapter_id)
        except BaseException as exc:  # every failure reaches the requests waiting on it
            _complete(load.future, exception=exc)
        else:
            _complete(load.future, result=result)
        self._blocked.discard(load)
        self._on_done()


def _complete(future: Future, result: LoraAdapter | None = None, exception: BaseException | None = None) -> bool:
    """Set a Future unless it is already set (the load thread and the engine may race); True if set."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        return False
    return True
