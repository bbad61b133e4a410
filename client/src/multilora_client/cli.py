"""`multilora`: generate text (streamed to the terminal) and manage adapters from a shell.

    multilora generate --adapter sql "List the customers in Berlin"
    multilora generate --protocol http --url localhost:8000 --max-tokens 64 --no-stream "Hi"
    multilora chat --adapter chat --system "Answer in one line." "What is LoRA?"
    multilora adapters list
    multilora adapters load acme/translate        # the server's token, if it has one: $MULTILORA_MANAGEMENT_TOKEN

Errors print the server's message and exit non-zero (2 for a bad request, 3 when the server is
not reachable or not ready, 4 on timeout, 1 otherwise), so scripts can tell them apart.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from .client import Client
from .errors import InvalidParameterError, MultiLoraError, RequestTimeoutError, ServerNotReadyError, UnknownAdapterError

EXIT_CODES = ((InvalidParameterError, 2), (UnknownAdapterError, 2), (ServerNotReadyError, 3),
              (RequestTimeoutError, 4), (MultiLoraError, 1))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; connection options are accepted before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help="server address, host[:port] or http(s)://host[:port] "
                             "(default: $MULTILORA_URL, else localhost with the protocol's port)")
    common.add_argument("--protocol", choices=("grpc", "http"), default=argparse.SUPPRESS,
                        help="grpc (port 8001) or http (port 8000); default grpc")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help="seconds to wait for each response (default 60)")
    common.add_argument("--model", default=argparse.SUPPRESS, help="model name (default lora_llm)")

    parser = argparse.ArgumentParser(prog="multilora", parents=[common],
                                     description="Client for the multi-LoRA model on Triton Inference Server.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", parents=[common], help="generate text with an adapter (or the base model)")
    gen.add_argument("prompt", help="the prompt; '-' reads it from standard input")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the answer")
    _add_generation_options(gen)

    chat = sub.add_parser("chat", parents=[common], help="answer one user message with the chat template")
    chat.add_argument("prompt", help="the user's message; '-' reads it from standard input")
    chat.add_argument("--system", help="a system message before it")
    _add_generation_options(chat)

    adapters = sub.add_parser("adapters", parents=[common], help="list, load or unload adapters")
    adapter_sub = adapters.add_subparsers(dest="action", required=True)
    adapter_sub.add_parser("list", parents=[common], help="adapters on disk, in host memory, on the device")
    for action in ("load", "unload"):
        one = adapter_sub.add_parser(action, parents=[common], help=f"{action} one adapter")
        one.add_argument("adapter_id")
        one.add_argument("--management-token", default=os.environ.get("MULTILORA_MANAGEMENT_TOKEN"),
                         help="the server's management token, if it has one (default: $MULTILORA_MANAGEMENT_TOKEN)")
    return parser


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", "-a", dest="adapter_id", help="adapter id; omit for the base model")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--stop", action="append", help="stop string (repeat for several)")
    parser.add_argument("--ignore-eos", action="store_true", default=None)
    parser.add_argument("--no-stream", dest="stream", action="store_false",
                        help="print the whole answer at the end instead of streaming it")
    parser.add_argument("--stats", action="store_true",
                        help="print finish reason and token counts to standard error at the end")


def sampling_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling keyword arguments the user set (unset ones stay the server's defaults)."""
    names = ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop", "ignore_eos")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def exit_code(error: MultiLoraError) -> int:
    return next(code for kind, code in EXIT_CODES if isinstance(error, kind))


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Entry point of the `multilora` command; returns the exit status."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        client = Client(getattr(args, "url", None), getattr(args, "protocol", "grpc"),
                        model=getattr(args, "model", "lora_llm"), timeout=getattr(args, "timeout", 60.0),
                        management_token=getattr(args, "management_token", None))
    except ValueError as exc:
        print(f"error: {exc}", file=err)
        return 2
    try:
        if args.command in ("generate", "chat"):
            return _generate(client, args, out, err)
        return _adapters(client, args, out)
    except MultiLoraError as exc:
        print(f"error: {exc.message}", file=err)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130


def chat_messages(args: argparse.Namespace, prompt: str) -> list[dict[str, str]]:
    """The chat `multilora chat` sends: an optional system message, then the user's."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": prompt}]


def _generate(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = sampling_arguments(args)
    chat = chat_messages(args, prompt) if args.command == "chat" else None
    if getattr(args, "echo", False):
        out.write(prompt)
    if args.stream:
        stream = client.chat_stream(chat, args.adapter_id, **sampling) if chat else \
            client.stream(prompt, args.adapter_id, **sampling)
        with stream as pieces:
            for piece in pieces:
                out.write(piece)
                out.flush()
            generation = pieces.generation
    else:
        # Streams never repeat the prompt; ask the same of the whole answer, so both modes print the same.
        generation = client.chat(chat, args.adapter_id, **sampling) if chat else \
            client.generate(prompt, args.adapter_id, exclude_input_in_output=True, **sampling)
        out.write(generation.text)
    out.write("\n")
    if args.stats and generation is not None:
        print(f"[finish_reason={generation.finish_reason} prompt_tokens={generation.prompt_tokens} "
              f"completion_tokens={generation.completion_tokens}]", file=err)
    return 0


def _adapters(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "list":
        listing = client.adapters()
        for tier in ("device", "host", "disk"):
            names = getattr(listing, tier)
            print(f"{tier:6} ({len(names)}): {', '.join(names) if names else '-'}", file=out)
        return 0
    result = client.load_adapter(args.adapter_id) if args.action == "load" else client.unload_adapter(args.adapter_id)
    print(json.dumps(result, indent=2, sort_keys=True), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
