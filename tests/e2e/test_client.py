"""multilora_client against the real server: sync and async, gRPC and HTTP, typed errors, the CLI."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest
from multilora_client import (
    AdapterLoadError,
    AsyncClient,
    Client,
    InvalidParameterError,
    MultiLoraError,
    UnknownAdapterError,
)

pytestmark = pytest.mark.e2e
PROMPT = "List the names of all customers in Berlin."
PROTOCOLS = ["grpc", "http"]


def url_for(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.url


def expected(engine, adapter: str | None, max_tokens: int = 12) -> str:
    request = GenerationRequest("ref", PROMPT, SamplingParams(max_tokens=max_tokens), adapter)
    return engine.generate([request])["ref"][-1].text


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sync_generate_and_stream_agree_with_the_engine(server, reference_engine, protocol):
    client = Client(url_for(server, protocol), protocol)
    assert client.is_ready()
    generation = client.generate(PROMPT, adapter_id="sql", max_tokens=12, exclude_input_in_output=True)
    assert generation.text == expected(reference_engine, "sql")
    # The server's default, as Triton's vLLM backend: the non-streamed text starts with the prompt.
    assert client.generate(PROMPT, adapter_id="sql", max_tokens=12).text == PROMPT + generation.text
    assert generation.finish_reason in ("length", "eos")
    assert generation.prompt_tokens > 0 and 0 < generation.completion_tokens <= 12

    stream = client.stream(PROMPT, adapter_id="sql", max_tokens=12)
    pieces = list(stream)
    assert len(pieces) > 1, "streaming must deliver more than one piece"
    assert "".join(pieces) == generation.text
    assert stream.generation == generation


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_base_model_and_sampling_arguments(server, reference_engine, protocol):
    client = Client(url_for(server, protocol), protocol)
    greedy = client.generate(PROMPT, max_tokens=12, exclude_input_in_output=True).text
    assert greedy == expected(reference_engine, None)
    seeded = [client.generate(PROMPT, "chat", max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=7).text
              for _ in range(2)]
    assert seeded[0] == seeded[1], "same seed, same text"
    # stop (a list: a [1, N] tensor over gRPC, sampling_parameters over HTTP) must reach the engine.
    for adapter in ("sql", "chat", "summarize", None):
        text = client.generate("hello", adapter, max_tokens=12, exclude_input_in_output=True).text
        stops = [text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isalnum()]
        if stops:
            stopped = client.generate("hello", adapter, max_tokens=12, stop=[stops[0], "never-seen"],
                                      exclude_input_in_output=True)
            assert stopped.finish_reason == "stop" and stopped.text == text[:text.index(stops[0])]
            break


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_generate_stream_and_many_adapters_at_once(server, reference_engine, protocol):
    adapters = ["sql", "chat", "summarize", "acme/translate", None]

    async def run():
        async with AsyncClient(url_for(server, protocol), protocol) as client:
            assert await client.is_ready()
            together = await asyncio.gather(*[client.generate(PROMPT, a, max_tokens=12, exclude_input_in_output=True)
                                              for a in adapters])
            stream = client.stream(PROMPT, "chat", max_tokens=12)
            pieces = [piece async for piece in stream]
            return together, pieces, stream.generation

    together, pieces, streamed = asyncio.run(run())
    for adapter, generation in zip(adapters, together):
        assert generation.text == expected(reference_engine, adapter), adapter
    assert len(pieces) > 1 and "".join(pieces) == together[1].text == streamed.text


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_adapter_is_a_typed_error_naming_it(server, protocol):
    client = Client(url_for(server, protocol), protocol)
    with pytest.raises(UnknownAdapterError, match="nope") as info:
        client.generate(PROMPT, adapter_id="nope")
    assert info.value.adapter_id == "nope" and "unknown adapter 'nope'" in str(info.value)
    with pytest.raises(UnknownAdapterError, match="nope"):
        list(client.stream(PROMPT, adapter_id="nope"))

    async def run():
        async with AsyncClient(url_for(server, protocol), protocol) as aclient:
            with pytest.raises(UnknownAdapterError, match="nope"):
                await aclient.generate(PROMPT, adapter_id="nope")
            with pytest.raises(UnknownAdapterError, match="nope"):
                [piece async for piece in aclient.stream(PROMPT, adapter_id="nope")]

    asyncio.run(run())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_top_p_is_invalid_parameter(server, protocol):
    client = Client(url_for(server, protocol), protocol)
    with pytest.raises(InvalidParameterError) as info:
        client.generate(PROMPT, top_p=1.5)
    assert info.value.field == "top_p" and "(0, 1]" in str(info.value)

    async def run():
        async with AsyncClient(url_for(server, protocol), protocol) as aclient:
            with pytest.raises(InvalidParameterError, match="top_p"):
                [piece async for piece in aclient.stream(PROMPT, top_p=1.5)]

    asyncio.run(run())


def test_leaving_a_stream_early_does_not_hurt_the_server(server, reference_engine):
    client = Client(server.grpc_url)
    with client.stream(PROMPT, "chat", max_tokens=400, ignore_eos=True) as stream:
        next(stream)
    assert client.generate(PROMPT, "sql", max_tokens=12, exclude_input_in_output=True).text == \
        expected(reference_engine, "sql")


def test_cli_streams_to_the_terminal(server, reference_engine):
    multilora = Path(sys.executable).with_name("multilora")
    result = subprocess.run([str(multilora), "generate", "--url", server.grpc_url, "--adapter", "sql",
                             "--max-tokens", "12", "--stats", PROMPT], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == expected(reference_engine, "sql") + "\n"
    assert b"finish_reason=" in result.stderr
    whole = subprocess.run([str(multilora), "generate", "--url", server.grpc_url, "--adapter", "sql", "--no-stream",
                            "--max-tokens", "12", PROMPT], capture_output=True, timeout=120)
    assert whole.stdout == result.stdout, "--no-stream prints the same text as streaming"
    bad = subprocess.run([str(multilora), "generate", "--protocol", "http", "--url", server.url, "--adapter", "nope",
                          PROMPT], capture_output=True, timeout=120)
    assert bad.returncode == 2 and b"unknown adapter 'nope'" in bad.stderr
    listing = subprocess.run([str(multilora), "adapters", "list", "--url", server.grpc_url], capture_output=True,
                             timeout=120, text=True)
    assert listing.returncode == 0, listing.stderr
    assert any(line.startswith("disk") and "sql" in line for line in listing.stdout.splitlines())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_adapter_management(server, protocol):
    client = Client(url_for(server, protocol), protocol)
    try:
        listing = client.adapters()
    except MultiLoraError as exc:
        if "adapter_command" in str(exc) or "missing required input" in str(exc):
            pytest.skip(f"this server does not answer adapter_command yet: {exc}")
        raise
    assert "sql" in listing.disk and "acme/translate" in listing.disk
    loaded = client.load_adapter("summarize")
    assert loaded["loaded"] and loaded["adapter_id"] == "summarize"
    assert "summarize" in client.adapters().host
    assert client.unload_adapter("summarize") == {"adapter_id": "summarize", "unloaded": True}
    assert "summarize" not in client.adapters().host
    with pytest.raises(UnknownAdapterError, match="nope"):
        client.load_adapter("nope")
    with pytest.raises(AdapterLoadError, match="mismatch"):
        client.load_adapter("mismatch")

    async def run():
        async with AsyncClient(url_for(server, protocol), protocol) as aclient:
            return await aclient.adapters()

    assert "sql" in asyncio.run(run()).disk
