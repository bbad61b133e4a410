"""The OpenAI/TGI gateway as a child process for e2e and reliability tests, and one HTTP helper."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

from multilora.launcher import free_port


@contextlib.contextmanager
def running_gateway(triton_grpc: str, log: Path, *options: str) -> Iterator[str]:
    """`python -m multilora_client.gateway`, as the launcher starts it; yields its base URL."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "multilora_client.gateway", "--triton-grpc", triton_grpc,
                                    "--host", "127.0.0.1", "--port", str(port), *options],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not listening(port):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def post_json(url: str, payload: dict | bytes, timeout: float = 120) -> tuple[int, Message, bytes]:
    """POST a JSON body (or raw bytes); the status, the headers (names in any case) and the body."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()
