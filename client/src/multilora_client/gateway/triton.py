"""The gateway's side of Triton: lora_llm requests over async gRPC streaming, the adapter list, and
the base model's name. Built on the package's AsyncClient (one gRPC stream per call, cancelled when
the caller stops reading)."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from ..aio import AsyncClient
from ..errors import from_exception
from ..request import build_request, grpc_inputs
from ..response import Chunk


@dataclass(frozen=True)
class TritonCall:
    """One lora_llm generation: a prompt or chat messages, the adapter (None: the base model),
    and sampling fields by lora_llm's names."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    adapter_id: str | None = None
    stream: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> list[tuple[str, str, np.ndarray]]:
        """lora_llm's input tensors. The text never echoes the prompt (the APIs add it themselves when
        asked); `messages` replaces `text_input` (interim: until the client builds chat requests itself)."""
        request = build_request(self.prompt or "-", self.adapter_id, self.stream, exclude_input_in_output=True,
                                **self.sampling)
        tensors = request.tensors()
        if self.messages is None:
            return tensors
        messages = np.array([[json.dumps(self.messages).encode("utf-8")]], dtype=np.object_)
        return [("messages", "BYTES", messages)] + [t for t in tensors if t[0] != "text_input"]


# Between reconnection attempts while Triton is down (restarting): the gateway serves again within this
# long of Triton's return, however long it was away.
RECONNECT_BACKOFF_S = 1.0


class Triton:
    """Create inside the event loop that uses it (gRPC aio channels belong to one loop)."""

    def __init__(self, url: str, model: str, timeout: float | None, base_model_name: str | None = None) -> None:
        self.client = AsyncClient(url, "grpc", model=model, timeout=timeout, reconnect_backoff_s=RECONNECT_BACKOFF_S)
        self._base_model_name = base_model_name

    async def close(self) -> None:
        await self.client.close()

    def chunks(self, call: TritonCall) -> AsyncIterator[Chunk]:
        """lora_llm's responses to `call`; closing the iterator early cancels the request on the server."""
        return self.client._grpc_chunks(grpc_inputs(call.tensors()), {})

    async def adapter_ids(self) -> list[str]:
        """Every adapter the server can serve: those in adapter_dir, and any loaded from elsewhere."""
        listing = await self.client.adapters()
        return sorted(set(listing.disk) | set(listing.host) | set(listing.device))

    async def base_model_name(self) -> str:
        """The name clients use for the base model: given at start, else lora_llm's base_model parameter."""
        if self._base_model_name is None:
            try:
                config = await self.client._grpc_client().get_model_config(self.client.endpoint.model, as_json=True)
            except Exception as exc:  # noqa: BLE001 - tritonclient's and grpc's own types
                raise from_exception(exc) from exc
            parameters = config.get("config", {}).get("parameters", {})
            value = parameters.get("base_model", {}).get("string_value") or self.client.endpoint.model
            self._base_model_name = served_name(value)
        return self._base_model_name

    async def is_ready(self) -> bool:
        return await self.client.is_ready()


def served_name(base_model: str) -> str:
    """A Hub id or relative path as written (`meta-llama/Llama-3.1-8B-Instruct`); an absolute
    path's last folder (`/models/Llama-3.1-8B-Instruct` -> `Llama-3.1-8B-Instruct`)."""
    base_model = base_model.rstrip("/")
    return PurePosixPath(base_model).name if base_model.startswith("/") else base_model
