"""`python -m multilora_client.gateway`: serve the gateway with uvicorn."""
from __future__ import annotations

import argparse
import os


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m multilora_client.gateway",
                                     description="OpenAI- and TGI-compatible HTTP gateway in front of lora_llm "
                                                 "on Triton Inference Server")
    parser.add_argument("--triton-grpc", default=os.environ.get("MULTILORA_URL", "localhost:8001"), metavar="HOST:PORT",
                        help="Triton's gRPC endpoint (default: $MULTILORA_URL or localhost:8001)")
    parser.add_argument("--triton-http", default=None, metavar="URL",
                        help="Triton's HTTP URL: KServe v2 requests to /v2/... are checked and passed on to it "
                             "(default: none, /v2 is off)")
    parser.add_argument("--model", default="lora_llm", help="the Triton model to call (default: lora_llm)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on (default: 9000)")
    parser.add_argument("--base-model-name", default=None,
                        help="OpenAI `model` name of the base model (default: lora_llm's base_model parameter; "
                             "an absolute path gives its last folder name)")
    parser.add_argument("--default-max-tokens", type=int, default=256,
                        help="new tokens when a request gives no max_tokens / max_new_tokens (default: 256)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for each response from Triton, i.e. for a whole non-streamed "
                             "answer (default: 300)")
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20,
                        help="larger request bodies are refused with 413 (default: 4 MiB)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds running answers may still take; then streams end with an error "
                             "event (default: 30, Triton's own exit timeout)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        from .app import GatewayConfig, create_app
        from .server import serve
    except ImportError as exc:
        raise SystemExit(f"the gateway needs its extra: pip install 'multilora-client[gateway]' ({exc})") from None
    config = GatewayConfig(triton_grpc=args.triton_grpc, model=args.model, base_model_name=args.base_model_name,
                           default_max_tokens=args.default_max_tokens, timeout=args.timeout,
                           max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout,
                           triton_http=args.triton_http)
    serve(create_app(config), args.host, args.port, args.log_level)


if __name__ == "__main__":
    main()
