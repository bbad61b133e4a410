"""`python -m multilora.launcher.health`: exit 0 when the server can really serve, else 1 and why.

For Docker's HEALTHCHECK and Kubernetes exec probes. Triton's own `/v2/health/ready` (and the
model's ready endpoint) stay 200 in tritonserver 2.51 after the python backend stub died, so this
also sends one real request: one generated token on the base model.

    python -m multilora.launcher.health --url http://127.0.0.1:8000 --timeout 10
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from multilora.launcher import probes


def check(url: str, model: str, timeout: float) -> str | None:
    """None when healthy, else the reason."""
    status = probes.http_status(f"{url}/v2/health/ready", timeout)
    if status != 200:
        return f"{url}/v2/health/ready answered {status or 'nothing'}"
    return probes.generate_once(url, model, timeout)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multilora.launcher.health", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('HTTP_PORT', 8000)}",
                   help="the server's HTTP URL (default: http://127.0.0.1:$HTTP_PORT, else port 8000)")
    p.add_argument("--model", default="lora_llm")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds for each of the two requests")
    args = p.parse_args(argv)
    reason = check(args.url.rstrip("/"), args.model, args.timeout)
    if reason is not None:
        print(f"unhealthy: {reason}", file=sys.stderr)
        return 1
    print(f"healthy: {args.model} generated a token at {args.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
