"""The gateway's shutdown: let running answers finish, up to a deadline, then cut them with an error.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the open ones; `Drain`
adds the deadline the launcher gives Triton too (`--drain-timeout`, Triton's `--exit-timeout-secs`).
At that deadline every answer still waiting for Triton ends at once: a stream with an error event
in its API's shape, a whole answer with 503. A client never sees its stream just stop.
"""
from __future__ import annotations

import asyncio
import logging

from .errors import ShuttingDown

log = logging.getLogger(__name__)


class Drain:
    """Create it anywhere; `attach` it in the event loop that serves (the app's lifespan)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.started = False
        self.deadline: asyncio.Future[None] | None = None  # done once the drain time is over
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.deadline = loop.create_future()

    def begin(self) -> None:
        """Start the drain time; safe to call from a signal handler, and more than once."""
        if self.started or self._loop is None:
            return
        self.started = True
        self._loop.call_soon_threadsafe(self._loop.call_later, self.timeout_s, self._cut)

    def _cut(self) -> None:
        if self.deadline is not None and not self.deadline.done():
            log.warning("drain time (%g s) over: cutting the answers still running", self.timeout_s)
            self.deadline.set_result(None)

    def error(self) -> ShuttingDown:
        return ShuttingDown(f"the gateway is shutting down and its drain time ({self.timeout_s:g} s) is over: "
                            "this answer was cut before its end; retry it")
