"""Whether the adapters in the host tier still match their files: looked at when requests arrive.

With `management: read` nobody may `unload`, and an adapter deleted or replaced on disk used to be
served from memory, and listed, until a restart (issue 23). So a request that finds its adapter in
the host tier, when that adapter's files were last looked at more than `interval_s` ago, waits for
one look: the files' identity (files.files_identity: one stat per file) against the one the
adapter was read with. Unchanged, the request goes on with the cached weights, usually within the
same engine step (a stat takes microseconds); changed or gone, the store drops the cached copy and
reads the folder again for this request and the later ones, which gives a deleted adapter's
requests the unknown-adapter error.

A look runs in a thread of its own, never on the engine thread: a stat on a hung mount blocks too.
One that has not answered within WAIT_S lets its requests go on with the cached weights (storage
that does not answer is no reason to refuse weights already in memory); while it stays
unanswered no second look at that adapter starts, and at most MAX_UNANSWERED looks wait at once,
so hung storage costs a bounded number of parked threads and every request is served from memory.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from .files import LoraAdapter, files_identity
from .loader import complete_once

log = logging.getLogger(__name__)
WAIT_S = 0.5  # a look not answered by then serves the cached weights
MAX_UNANSWERED = 8  # looks waiting on storage at once; beyond, requests are served from memory unlooked


@dataclass(eq=False)
class Look:
    adapter: LoraAdapter  # the cached copy looked at
    future: Future  # what its requests wait on: the cached copy once found unchanged
    started: float
    changed: bool | None = None  # the answer, set by its thread


class FreshnessChecks:
    """Owned by the engine thread, like the host tier; the look threads only stat and answer."""

    def __init__(self, locate: Callable[[str], Path], interval_s: float, on_done: Callable[[], None]) -> None:
        """`locate`: an adapter's folder (raises once it is gone); `interval_s` 0: never look."""
        self._locate = locate
        self.interval_s = interval_s
        self._on_done = on_done  # wakes the engine loop
        self._seen: dict[str, float] = {}  # when each cached adapter's files were read or last found unchanged
        self._looks: dict[str, Look] = {}  # unanswered or not yet collected by `poll`

    def loaded(self, adapter_id: str, now: float) -> None:
        """A load of `adapter_id` has just read its files."""
        self._seen[adapter_id] = now

    def forget(self, adapter_id: str) -> None:
        self._seen.pop(adapter_id, None)

    def look(self, adapter: LoraAdapter, now: float) -> Future | None:
        """None: serve the cached `adapter` now. Otherwise a Future its requests wait on: the adapter
        once its files are found unchanged; when they changed, `poll` hands it to the store."""
        adapter_id = adapter.adapter_id
        pending = self._looks.get(adapter_id)
        if pending is not None:
            return pending.future if pending.adapter is adapter and not pending.future.done() else None
        if not self.interval_s or now - self._seen.get(adapter_id, now) < self.interval_s:
            return None
        if sum(1 for look in self._looks.values() if look.changed is None) >= MAX_UNANSWERED:
            return None
        look = Look(adapter, Future(), now)
        self._looks[adapter_id] = look
        threading.Thread(target=self._run, args=(look,), name=f"adapter-check:{adapter_id}", daemon=True).start()
        return look.future

    def poll(self, now: float) -> list[Look]:
        """The looks answered since the last poll that found the files changed or gone. A look
        unanswered after WAIT_S lets its requests have the cached weights."""
        changed = []
        for adapter_id, look in list(self._looks.items()):
            if look.changed is None:
                if now - look.started >= WAIT_S and complete_once(look.future, result=look.adapter):
                    log.warning("adapter '%s': its files did not answer a stat within %g s; serving the "
                                "copy in memory", adapter_id, WAIT_S)
                continue
            del self._looks[adapter_id]
            self._seen[adapter_id] = now
            if look.changed:
                changed.append(look)
        return changed

    def _run(self, look: Look) -> None:
        adapter = look.adapter
        try:
            changed = files_identity(self._locate(adapter.adapter_id)) != adapter.files
        except Exception:  # gone, or no longer inside adapter_dir: reading it again says which
            changed = True
        look.changed = changed
        if not changed:
            complete_once(look.future, result=adapter)
        self._on_done()
