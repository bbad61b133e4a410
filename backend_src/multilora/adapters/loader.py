"""Adapter loads off the engine thread: each in a thread of its own, limited in rate and number.

A load reads files (see files.py: plain reads that release the interpreter while they wait),
so a load stalled on hung storage blocks only its own thread. Loads start at most `max_concurrent`
at a time and at most `per_second` per second (a token bucket), so one client cycling through cold
adapters cannot take the machine from the requests of resident ones.

A stalled load must not take the places of healthy ones either (issue 23: five adapters on hung
storage held every place until adapter_load_timeout_s, and a healthy cold adapter waited 57.8 s).
So a load still running `stall_s` after it started counts as stalled: it goes on (its requests
still get it if it finishes before their timeout), but no longer counts against `max_concurrent`.
The engine abandons it at adapter_load_timeout_s (its requests fail; a late result is dropped);
its thread stays parked in its system call until the read returns, and the adapter is not loaded
again before that (`blocked_load`: its requests fail at once). At most `max_stalled` stalled or
abandoned threads are excused from `max_concurrent`; any beyond that hold their place again, so
however many adapters hang, the loader never runs more than `max_concurrent + max_stalled` threads.

Started and abandoned only by the engine thread; the load threads only compute, complete their
Future and mark their Load returned.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from .files import LoraAdapter

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Load:
    adapter_id: str
    future: Future = field(default_factory=Future)
    started: float | None = None  # monotonic time its thread started; None while queued
    abandoned: bool = False  # given up on by the engine (timeout); its thread may still run
    returned: bool = False  # set by its thread when the load function has returned


class AdapterLoader:
    def __init__(self, load: Callable[[str], LoraAdapter], max_concurrent: int, per_second: float,
                 on_done: Callable[[], None] = lambda: None, *, stall_s: float = 5.0, max_stalled: int = 16) -> None:
        self._load = load
        self.max_concurrent = max_concurrent
        self.per_second = per_second
        self.stall_s = stall_s
        self.max_stalled = max_stalled
        self._on_done = on_done  # wakes the engine loop
        self._queue: deque[Load] = deque()
        self._threads: list[Load] = []  # loads whose thread has not returned, oldest first
        self._tokens = float(max_concurrent)
        self._refilled = time.monotonic()

    def submit(self, adapter_id: str, future: Future | None = None) -> Load:
        """Queue a load of `adapter_id`, completing `future` (a new one by default)."""
        load = Load(adapter_id, future if future is not None else Future())
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
        self._threads = [load for load in self._threads if not load.returned]
        while self._queue and self._busy(now) < self.max_concurrent and (
                self.per_second <= 0 or self._tokens >= 1.0):
            load = self._queue.popleft()
            if load.future.done():  # abandoned while queued
                continue
            self._tokens -= 1.0
            load.started = now
            self._threads.append(load)
            threading.Thread(target=self._run, args=(load,), name=f"adapter-load:{load.adapter_id}",
                             daemon=True).start()

    def _busy(self, now: float) -> int:
        """Places taken: every running thread, less the stalled ones excused (max_stalled at most)."""
        stalled = sum(1 for load in self._threads if not load.returned and self._stalled(load, now))
        return len(self._threads) - min(stalled, self.max_stalled)

    def _stalled(self, load: Load, now: float) -> bool:
        return load.abandoned or now - load.started >= self.stall_s

    def abandon(self, load: Load, error: Exception) -> None:
        """Give up on a load (timeout): its requests fail now; a late result is dropped."""
        if not complete_once(load.future, exception=error):
            return  # it finished first
        load.abandoned = True
        if load.started is not None:
            log.error("adapter '%s': load abandoned after %.1f s (%s); %d load thread(s) still blocked",
                      load.adapter_id, time.monotonic() - load.started, error, self.blocked)

    def blocked_load(self, adapter_id: str) -> Load | None:
        """An abandoned load of `adapter_id` whose thread is still waiting (e.g. on hung storage)."""
        return next((load for load in self._threads
                     if load.adapter_id == adapter_id and load.abandoned and not load.returned), None)

    @property
    def blocked(self) -> int:
        """Abandoned loads whose thread is still waiting (e.g. on hung storage)."""
        return sum(1 for load in self._threads if load.abandoned and not load.returned)

    @property
    def threads(self) -> int:
        """Load threads that have not returned (running, stalled or abandoned)."""
        return sum(1 for load in self._threads if not load.returned)

    def _run(self, load: Load) -> None:
        try:
            result = self._load(load.adapter_id)
        except BaseException as exc:  # every failure reaches the requests waiting on it
            complete_once(load.future, exception=exc)
        else:
            complete_once(load.future, result=result)
        load.returned = True
        self._on_done()


def complete_once(future: Future, result: LoraAdapter | None = None, exception: BaseException | None = None) -> bool:
    """Set a Future unless it is already set (the load thread and the engine may race); True if set."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        return False
    return True
