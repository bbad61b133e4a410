"""Chat templates per adapter: parsing `messages`, finding the template, rendering, end-of-turn tokens,
the cache, and the engine stopping on an adapter template's own end-of-turn token."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from multilora.config import EngineConfig
from multilora.engine.chat_template import MAX_TEMPLATE_BYTES, ChatTemplates
from multilora.engine.llm_engine import LLMEngine
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import FinishReason, GenerationRequest
from multilora.errors import AdapterLoadError, InvalidParameterError

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
          "{{ m.content }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
PLAIN = ("{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}"
         "{% if add_generation_prompt %}### assistant:{% endif %}")
EOS_TURNS = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def tokenizer(demo_dir: Path):
    """The demo's tokenizer (no chat template of its own) with ChatML's and Llama 3's special tokens."""
    tok = AutoTokenizer.from_pretrained(demo_dir / "base")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tok


def adapter(root: Path, adapter_id: str, files: dict[str, str] | None = None) -> Path:
    folder = root / adapter_id
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


def ids(tokenizer, *tokens: str) -> frozenset[int]:
    return frozenset(tokenizer.convert_tokens_to_ids(list(tokens)))


# -- which template ----------------------------------------------------------------------------
def test_an_adapters_own_template_wins_over_the_base_models(tokenizer, tmp_path):
    adapter(tmp_path, "chatml", {"chat_template.jinja": CHATML})
    adapter(tmp_path, "acme/llama", {"tokenizer_config.json": json.dumps({"chat_template": LLAMA3})})
    adapter(tmp_path, "named", {"tokenizer_config.json": json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]})})
    adapter(tmp_path, "both",
            {"chat_template.jinja": CHATML, "tokenizer_config.json": json.dumps({"chat_template": "x"})})
    adapter(tmp_path, "plain", {"tokenizer_config.json": json.dumps({"model_max_length": 10})})
    tokenizer.chat_template = PLAIN
    try:
        templates = ChatTemplates(tokenizer, tmp_path)
        assert templates.render(HELLO).text == "### user: Hello\n### assistant:"
        assert templates.render(HELLO, "plain").text == "### user: Hello\n### assistant:"  # none of its own
        chatml = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
        assert templates.render(HELLO, "chatml").text == chatml
        assert templates.render(HELLO, "named").text == chatml
        assert templates.render(HELLO, "both").text == chatml  # the .jinja file first, as transformers
        assert templates.render(HELLO, "acme/llama").text == (
            "<s><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    finally:
        tokenizer.chat_template = None


def test_the_end_of_turn_token_comes_from_the_template(tokenizer, tmp_path):
    adapter(tmp_path, "chatml", {"chat_template.jinja": CHATML})
    adapter(tmp_path, "llama", {"chat_template.jinja": LLAMA3})
    adapter(tmp_path, "eos", {"chat_template.jinja": EOS_TURNS})
    adapter(tmp_path, "plain", {"chat_template.jinja": PLAIN})
    templates = ChatTemplates(tokenizer, tmp_path)
    assert templates.render(HELLO, "chatml").stop_token_ids == ids(tokenizer, "<|im_end|>")
    assert templates.render(HELLO, "llama").stop_token_ids == ids(tokenizer, "<|eot_id|>")
    assert templates.render(HELLO, "eos").stop_token_ids == {tokenizer.eos_token_id}
    assert templates.render(HELLO, "plain").stop_token_ids == frozenset()  # turns end in plain text


def test_no_template_anywhere_is_a_clear_error(tokenizer, tmp_path):
    adapter(tmp_path, "plain")
    templates = ChatTemplates(tokenizer, tmp_path)
    for adapter_id in (None, "plain", "not-on-disk"):
        with pytest.raises(InvalidParameterError, match="'messages': the base model has no chat template"):
            templates.render(HELLO, adapter_id)


def test_a_template_that_raises_names_its_source(tokenizer, tmp_path):
    strict = "{% if messages[0].role != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}"
    adapter(tmp_path, "strict", {"chat_template.jinja": strict})
    adapter(tmp_path, "broken", {"chat_template.jinja": "{% for m in messages %}"})
    adapter(tmp_path, "badjson", {"tokenizer_config.json": "{nope"})
    templates = ChatTemplates(tokenizer, tmp_path)
    with pytest.raises(InvalidParameterError, match=r"chat template of adapter 'strict' \(chat_template.jinja\) "
                                                    "refused them: .*a system message must come first"):
        templates.render(HELLO, "strict")
    with pytest.raises(InvalidParameterError, match="adapter 'broken'.*TemplateSyntaxError"):
        templates.render(HELLO, "broken")
    with pytest.raises(InvalidParameterError, match="badjson/tokenizer_config.json is not a JSON object"):
        templates.render(HELLO, "badjson")


def test_templates_are_read_once_until_invalidated(tokenizer, tmp_path):
    folder = adapter(tmp_path, "sql", {"chat_template.jinja": CHATML})
    templates = ChatTemplates(tokenizer, tmp_path)
    first = templates.render(HELLO, "sql").text
    (folder / "chat_template.jinja").write_text(PLAIN)
    assert templates.render(HELLO, "sql").text == first  # cached: no file read per request
    templates.invalidate("sql")
    assert templates.render(HELLO, "sql").text == "### user: Hello\n### assistant:"


def test_an_adapter_not_on_disk_yet_is_looked_for_again(tokenizer, tmp_path):
    tokenizer.chat_template = PLAIN
    try:
        templates = ChatTemplates(tokenizer, tmp_path)
        assert templates.render(HELLO, "org/hub-adapter").text.startswith("### user")
        adapter(tmp_path, "org/hub-adapter", {"chat_template.jinja": CHATML})  # downloaded since
        assert templates.render(HELLO, "org/hub-adapter").text.startswith("<|im_start|>user")
    finally:
        tokenizer.chat_template = None


# -- in the engine ------------------------------------------------------------------------------
def chat(engine: LLMEngine, adapter_id: str | None, messages=HELLO, max_tokens: int = 6, echo: bool = False):
    request = GenerationRequest("r", "", SamplingParams(max_tokens=max_tokens), adapter_id,
                                exclude_input_in_output=not echo, messages=messages)
    return engine.generate([request])["r"][-1]


def first_token(engine: LLMEngine, adapter_id: str) -> tuple[list[dict], int]:
    """A conversation whose greedy answer starts with a whole token (not part of a UTF-8 character), and that token."""
    for text in ("Hello", "Hi there", "What is SQL?", "Good morning", "Summarize this", "Translate to French"):
        messages = [{"role": "user", "content": text}]
        ids = engine.tokenizer.encode(chat(engine, adapter_id, messages, max_tokens=1).text, add_special_tokens=False)
        if len(ids) == 1:
            return messages, ids[0]
    raise AssertionError("no candidate answer starts with a whole token")


def test_the_engine_renders_without_a_second_bos_and_stops_on_the_adapters_end_of_turn(demo_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(demo_dir / "base", base)
    (base / "chat_template.jinja").write_text("{{ bos_token }}" + PLAIN)  # turns end in plain text: no stop token
    shutil.copytree(demo_dir / "adapters" / "sql", tmp_path / "adapters" / "sql")
    config = EngineConfig(base_model=str(base), adapter_dir=str(tmp_path / "adapters"), kv_cache_memory="16MiB")
    engine = LLMEngine(config)
    rendered = engine.chat_templates.render(HELLO).text
    assert rendered.startswith("<s>### user")
    echoed = chat(engine, None, echo=True)
    assert echoed.prompt_tokens == len(engine.tokenizer.encode(rendered, add_special_tokens=False))
    assert echoed.text.startswith(rendered), "exclude_input_in_output=false echoes the rendered prompt"
    # The token the adapter answers with first becomes the end of its turns, in its own template.
    messages, token = first_token(engine, "sql")
    marker = engine.tokenizer.convert_ids_to_tokens(token)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": [marker]})
    tokenizer.save_pretrained(base)
    own = PLAIN.replace("{{ m.content }}", "{{ m.content }}{{ " + json.dumps(marker) + " if m.role == 'assistant' }}")
    (tmp_path / "adapters" / "sql" / "chat_template.jinja").write_text("{{ bos_token }}" + own)
    engine = LLMEngine(config)
    assert engine.chat_templates.render(messages, "sql").text == engine.chat_templates.render(messages).text
    assert engine.chat_templates.render(messages, "sql").stop_token_ids == {token}
    stopped = chat(engine, "sql", messages)
    assert (stopped.finish_reason, stopped.completion_tokens, stopped.text) == (FinishReason.EOS, 1, "")
    base_answer = chat(engine, None, messages)  # the base template adds no stop token
    assert (base_answer.finish_reason, base_answer.completion_tokens) == (FinishReason.LENGTH, 6)


# -- issue 23 item 1: template files are read as the weights are ----------------------------------
def test_template_files_are_read_only_inside_adapter_dir_and_never_echoed(tokenizer, tmp_path):
    """A symlink out of adapter_dir used to be followed: its text became the prompt (/etc/passwd) or
    the error message (a template raising its own text). FIFOs, device nodes and oversized files
    are refused as the weights' are; a symlink to another file inside adapter_dir is fine."""
    root, outside = tmp_path / "adapters", tmp_path / "outside"
    outside.mkdir()
    (outside / "raises.jinja").write_text("{{ raise_exception('SECRET from a template outside') }}")
    (outside / "passwd").write_text("root:x:0:0:SECRET root:/root:/bin/bash\n")
    (outside / "tokenizer_config.json").write_text(json.dumps({"chat_template": "SECRET {{ messages }}"}))
    links = {"raises": ("chat_template.jinja", "raises.jinja"), "passwd": ("chat_template.jinja", "passwd"),
             "config": ("tokenizer_config.json", "tokenizer_config.json")}
    for adapter_id, (name, target) in links.items():
        (adapter(root, adapter_id) / name).symlink_to(outside / target)
    os.mkfifo(adapter(root, "fifo") / "chat_template.jinja")
    adapter(root, "big", {"chat_template.jinja": CHATML + " " * MAX_TEMPLATE_BYTES})
    adapter(root, "chatml", {"chat_template.jinja": CHATML})
    (adapter(root, "shared") / "chat_template.jinja").symlink_to(root / "chatml" / "chat_template.jinja")
    templates = ChatTemplates(tokenizer, root)
    for adapter_id, (name, _) in links.items():
        with pytest.raises(AdapterLoadError, match=f"adapter '{adapter_id}': {name} resolves outside adapter_dir; "
                                                   "refused") as refused:
            templates.render(HELLO, adapter_id)
        assert "SECRET" not in str(refused.value)
    started = time.monotonic()
    with pytest.raises(AdapterLoadError, match="adapter 'fifo': chat_template.jinja is not a regular file; refused"):
        templates.render(HELLO, "fifo")
    assert time.monotonic() - started < 5
    with pytest.raises(AdapterLoadError,
                       match=f"adapter 'big': chat_template.jinja is {len(CHATML) + MAX_TEMPLATE_BYTES} "
                             f"bytes, above the limit of {MAX_TEMPLATE_BYTES}"):
        templates.render(HELLO, "big")
    assert templates.render(HELLO, "shared").text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
