"""Client for the multi-LoRA text generation model `lora_llm` on Triton Inference Server.

    from multilora_client import Client
    client = Client("localhost:8001")                      # gRPC; Client(url, protocol="http")
    print(client.generate("SELECT", adapter_id="sql", max_tokens=32).text)
    for piece in client.stream("Hello", adapter_id="chat"):
        print(piece, end="", flush=True)
"""
from .aio import AsyncClient
from .client import Client
from .errors import (
                     AdapterLoadError,
                     InvalidParameterError,
                     MultiLoraError,
                     RequestTimeoutError,
                     ServerNotReadyError,
                     UnknownAdapterError,
)
from .response import Adapters, Generation
from .streams import AsyncTextStream, TextStream

__all__ = [
    "Adapters", "AdapterLoadError", "AsyncClient", "AsyncTextStream", "Client", "Generation",
    "InvalidParameterError", "MultiLoraError", "RequestTimeoutError", "ServerNotReadyError", "TextStream",
    "UnknownAdapterError",
]
