"""The `multilora` command: argument parsing, sampling arguments, exit codes (no server needed)."""
from __future__ import annotations

import io

import pytest

from multilora_client import cli
from multilora_client.errors import (
    InvalidParameterError,
    MultiLoraError,
    RequestTimeoutError,
    ServerNotReadyError,
    UnknownAdapterError,
)


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_generate_arguments():
    args = parse("generate", "--adapter", "sql", "--max-tokens", "32", "--temperature", "0.7", "--top-p", "0.9",
                 "--stop", "END", "--stop", ";", "--url", "h:1", "--protocol", "http", "List customers")
    assert args.prompt == "List customers" and args.adapter_id == "sql" and args.stream is True
    assert (args.url, args.protocol) == ("h:1", "http")
    assert cli.sampling_arguments(args) == {"max_tokens": 32, "temperature": 0.7, "top_p": 0.9, "stop": ["END", ";"]}


def test_connection_options_before_the_subcommand_and_defaults():
    args = parse("--url", "h:2", "generate", "hi")
    assert args.url == "h:2" and not hasattr(args, "protocol")
    assert cli.sampling_arguments(args) == {}
    args = parse("generate", "--no-stream", "--ignore-eos", "--echo", "hi")
    assert args.stream is False and args.echo and cli.sampling_arguments(args) == {"ignore_eos": True}


def test_adapters_subcommands():
    assert parse("adapters", "list").action == "list"
    args = parse("adapters", "load", "acme/translate")
    assert (args.action, args.adapter_id) == ("load", "acme/translate")
    with pytest.raises(SystemExit):
        parse("adapters", "unload")


@pytest.mark.parametrize("error, code", [
    (InvalidParameterError("x"), 2), (UnknownAdapterError("x"), 2), (ServerNotReadyError("x"), 3),
    (RequestTimeoutError("x"), 4), (MultiLoraError("x"), 1),
])
def test_exit_codes(error, code):
    assert cli.exit_code(error) == code


def test_unreachable_server_prints_the_reason_and_exits_3():
    err = io.StringIO()
    code = cli.main(["generate", "--url", "127.0.0.1:1", "--timeout", "5", "hi"], stdout=io.StringIO(), stderr=err)
    assert code == 3 and err.getvalue().startswith("error: ")


def test_bad_url_exits_2():
    err = io.StringIO()
    assert cli.main(["generate", "--url", "ftp://x", "hi"], stdout=io.StringIO(), stderr=err) == 2
    assert "scheme" in err.getvalue()


def test_chat_sends_an_optional_system_message_and_the_users():
    args = parse("chat", "--adapter", "chat", "--system", "Be brief.", "--max-tokens", "8", "What is LoRA?")
    assert args.adapter_id == "chat" and cli.sampling_arguments(args) == {"max_tokens": 8}
    assert cli.chat_messages(args, args.prompt) == [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "What is LoRA?"}]
    plain = parse("chat", "Hi")
    assert cli.chat_messages(plain, plain.prompt) == [{"role": "user", "content": "Hi"}]


def test_management_token_comes_from_the_option_or_the_environment(monkeypatch):
    monkeypatch.setenv("MULTILORA_MANAGEMENT_TOKEN", "from-env")
    assert parse("adapters", "unload", "sql").management_token == "from-env"
    assert parse("adapters", "load", "sql", "--management-token", "t").management_token == "t"
