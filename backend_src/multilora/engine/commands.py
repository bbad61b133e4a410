"""The adapter management API (list | load | unload), carried out by the engine thread.

Commands arrive through the engine's inbox, in order with the requests around them, so an unload
takes effect for every request that arrives after it. A load answers once its adapter is in host
memory; its waiting does not hold the engine.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from ..adapters.slots import LoraSlots
from ..adapters.store import AdapterStore
from ..errors import InvalidParameterError
from .chat_template import ChatTemplates

Reply = Callable[[dict | None, Exception | None], None]


@dataclass
class Command:
    command: str  # list | load | unload
    adapter_id: str | None
    reply: Reply
    load: Future | None = None  # for `load`, once started


class AdapterCommands:
    def __init__(self, store: AdapterStore, slots: LoraSlots, chat_templates: ChatTemplates) -> None:
        self.store, self.slots, self.chat_templates = store, slots, chat_templates
        self.loading: list[Command] = []

    def start(self, command: Command) -> None:
        try:
            if command.command == "list":
                command.reply({**self.store.listing(), "device": self.slots.resident()}, None)
            elif command.command == "unload":
                known = self.store.unload(command.adapter_id)
                known |= self.slots.holds(command.adapter_id)
                self.forget([command.adapter_id])
                command.reply({"adapter_id": command.adapter_id, "unloaded": known}, None)
            elif command.command == "load":
                command.load = self.store.request(command.adapter_id)
                self.loading.append(command)
            else:
                raise InvalidParameterError("adapter_command", f"unknown command {command.command!r}")
        except Exception as error:  # every command gets exactly one answer
            command.reply(None, error)

    def forget(self, adapter_ids: list[str]) -> None:
        """Drop the device slots and chat templates of adapters unloaded, or whose files changed
        (AdapterStore.poll): rows running on the old weights keep their slot until they end."""
        for adapter_id in adapter_ids:
            self.slots.retire(adapter_id)
            self.chat_templates.invalidate(adapter_id)  # a replaced adapter may bring another template

    def answer_loads(self) -> None:
        for command in [c for c in self.loading if c.load.done()]:
            self.loading.remove(command)
            error = command.load.exception()
            if error is not None:
                command.reply(None, error)
                continue
            adapter = command.load.result()
            command.reply({"adapter_id": command.adapter_id, "loaded": True, "bytes": adapter.nbytes,
                           "ranks": sorted(adapter.ranks)}, None)
