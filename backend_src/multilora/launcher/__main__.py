"""`python -m multilora.launcher`: run tritonserver in the foreground, supervised.

    python -m multilora.launcher --model-repository model_repository
    python -m multilora.launcher --gateway-port 9000 --gateway-address 0.0.0.0 -- --log-verbose=1
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from multilora.launcher import probes
from multilora.launcher.gateway import GatewayProcess
from multilora.launcher.server import LOOPBACK, TRITON_EXIT_TIMEOUT_S, ServerStartError, TritonServer, client_host
from multilora.launcher.shm import remove_orphaned_regions
from multilora.launcher.supervisor import GaveUp, RestartPolicy, Supervisor

MODEL = "lora_llm"  # the model the banner's example asks


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m multilora.launcher",
        description="Run tritonserver in the foreground (the one on PATH, else the one from the "
                    "nvidia-pytriton wheel), restart it when it or a python backend stub dies, and "
                    "optionally run the OpenAI/TGI gateway next to it.",
        epilog="Arguments after `--` go to tritonserver unchanged, e.g. -- --log-verbose=1",
    )
    p.add_argument("--model-repository", default=env("MODEL_REPOSITORY", "model_repository"))
    p.add_argument("--http-port", type=int, default=int(env("HTTP_PORT", 8000)))
    p.add_argument("--grpc-port", type=int, default=int(env("GRPC_PORT", 8001)))
    p.add_argument("--metrics-port", type=int, default=int(env("METRICS_PORT", 8002)))
    p.add_argument("--http-address", default=env("HTTP_ADDRESS", LOOPBACK),
                   help="address HTTP and metrics bind to (default: $HTTP_ADDRESS, else loopback; "
                        "0.0.0.0 exposes the server, see docs/security.md)")
    p.add_argument("--grpc-address", default=env("GRPC_ADDRESS"),
                   help="address gRPC binds to (default: $GRPC_ADDRESS, else --http-address)")
    p.add_argument("--gateway-port", type=int, default=int(env("OPENAI_PORT") or 0),
                   help="run `python -m multilora_client.gateway` on this port once Triton is ready "
                        "(default: $OPENAI_PORT, else 0 = no gateway)")
    p.add_argument("--gateway-address", default=env("GATEWAY_ADDRESS"),
                   help="address the gateway binds to (default: $GATEWAY_ADDRESS, else --http-address); "
                        "0.0.0.0 here and Triton on loopback exposes only the gateway, which also passes "
                        "KServe v2 HTTP on to Triton after its checks (docs/security.md)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where the backend folder and the stub's Python are prepared "
                        "(default: $MULTILORA_STATE_DIR or <repo>/.run)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--exit-timeout-secs", type=int, default=None,
                   help="how long a shutdown lets in-flight requests finish, first the gateway's, then "
                        "Triton's (Triton's default: 30)")
    p.add_argument("--max-failed-starts", type=int, default=RestartPolicy.max_failed_starts,
                   help="restarts in a row that never become ready before the launcher gives up and exits "
                        "(a server that starts is restarted however often it dies, with a growing delay; "
                        "docs/reliability.md)")
    p.add_argument("tritonserver_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.tritonserver_args[:1] == ["--"]:
        args.tritonserver_args = args.tritonserver_args[1:]
    if not Path(args.model_repository).is_dir():
        p.error(f"--model-repository {args.model_repository!r} is not a directory")
    return args


def banner(server: TritonServer, gateway: GatewayProcess | None, adapters: Sequence[str] = ()) -> str:
    """What serves where, and a request to try: with the first of `adapters` (the served
    adapter_dir's, probes.served_adapters), or on the base model when there are none."""
    lines = [
        f"tritonserver ready ({server.install.binary}), started in {server.startup_seconds:.1f} s",
        f"  HTTP    {server.url}",
        f"  gRPC    {server.grpc_url}",
        f"  metrics {server.metrics_url}",
    ]
    if gateway is not None:
        lines.append(f"  OpenAI  http://{client_host(gateway.host)}:{gateway.port}/v1 (gateway; TGI at /generate, "
                     "KServe v2 HTTP at /v2)")
    parameters = ({"adapter_id": adapters[0]} if adapters else {}) | {"max_tokens": 64}
    body = json.dumps({"text_input": "Write one sentence about the sea.", "parameters": parameters})
    lines += [
        "try:",
        f"  curl -s -X POST {server.url}/v2/models/{MODEL}/generate \\",
        f"    -d '{body}'",
        "Ctrl-C stops the server.",
    ]
    return "\n".join(lines)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="launcher: %(message)s")
    remove_orphaned_regions()
    try:
        server = TritonServer(
            args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
            metrics_port=args.metrics_port, http_address=args.http_address, grpc_address=args.grpc_address,
            state_dir=args.state_dir, extra_args=args.tritonserver_args,
            startup_timeout=args.startup_timeout, exit_timeout_secs=args.exit_timeout_secs,
        )
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    gateway = None
    if args.gateway_port:
        drain = args.exit_timeout_secs if args.exit_timeout_secs is not None else TRITON_EXIT_TIMEOUT_S
        gateway = GatewayProcess(args.gateway_port, args.gateway_address or args.http_address, server.grpc_url,
                                 drain_timeout_s=drain, triton_http=server.url)
    supervisor = Supervisor(server, gateway, policy=RestartPolicy(max_failed_starts=args.max_failed_starts))
    # `docker stop` and Kubernetes send SIGTERM: the same clean shutdown as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    print(" ".join(server.command), flush=True)
    try:
        supervisor.start()
        print(banner(server, supervisor.gateway, probes.served_adapters(server.url, MODEL, timeout=5)),
              flush=True)
        supervisor.run()
    except (ServerStartError, GaveUp) as e:
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
