"""Where the server is: one parsed URL shared by the sync and async clients and the CLI."""
from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from .request import MODEL_NAME

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}  # tritonserver's defaults


@dataclass(frozen=True)
class Endpoint:
    """`target` is host:port as tritonclient wants it (no scheme); `ssl` from an https:// URL."""

    protocol: str
    target: str
    ssl: bool = False
    model: str = MODEL_NAME

    @property
    def http_base(self) -> str:
        return f"{'https' if self.ssl else 'http'}://{self.target}"

    def model_url(self, endpoint: str) -> str:
        """e.g. model_url("generate_stream") -> http://host:8000/v2/models/lora_llm/generate_stream"""
        return f"{self.http_base}/v2/models/{self.model}/{endpoint}"


def parse_endpoint(url: str | None, protocol: str = "grpc", model: str = MODEL_NAME) -> Endpoint:
    """Accept `host`, `host:port`, `http://host:port`, `https://host`, `grpc://host:port`; a
    missing port is the protocol's default; no URL at all means $MULTILORA_URL or localhost."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    url = url or os.environ.get("MULTILORA_URL") or "localhost"
    parts = urlsplit(url if "://" in url else f"//{url}")
    if parts.scheme not in ("", "http", "https", "grpc", "grpcs"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in URL {url!r}")
    if parts.path not in ("", "/"):
        raise ValueError(f"URL {url!r} must not have a path: the client adds /v2/models/{model}/...")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = parts.port or DEFAULT_PORTS[protocol]
    return Endpoint(protocol, f"{host}:{port}", ssl=parts.scheme in ("https", "grpcs"), model=model)
