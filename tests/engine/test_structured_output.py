"""Structured output through the engine, on the tiny random model: it emits garbage, so every valid
output here is the grammar's doing. Schemas bound every string, number and list, so that a random
walk through them ends well within max_tokens (the grammar ends with the model's EOS)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine_kit import make_engine, req
from multilora.engine import grammar
from multilora.engine.sequence import FinishReason
from multilora.errors import InvalidParameterError

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog", 3, None]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3}},
     "required": ["name", "age", "kind"], "additionalProperties": False},
    {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": -1000, "maximum": 1000}, "ok": {"type": "boolean"},
        "items": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "note": {"anyOf": [{"type": "string", "minLength": 2, "maxLength": 8}, {"type": "null"}]}},
     "required": ["id", "ok", "items"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 6},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                          "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                         "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"},
                                      "label": {"const": "segment"}},
     "required": ["from", "to", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
                                      "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
                                      "why": {"type": "string", "maxLength": 6}},
     "required": ["answer", "confidence", "why"], "additionalProperties": False},
]
ADAPTERS = [None, "sql", "chat", "summarize"]
MAX_TOKENS = 256  # far above the longest output of any schema above, even one byte per token


def as_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "test", "schema": schema, "strict": True}}


def test_fifty_json_schema_requests_over_three_adapters_and_the_base_all_parse_and_validate(demo_dir):
    """Issue 22's floor: 100% of 50 constrained requests parse and validate, sampled (seeded, with
    top-k / top-p / a penalty on some) or greedy, sharing steps with free requests."""
    engine = make_engine(demo_dir, kv_cache_memory="64MiB")
    constrained = []
    for i in range(50):
        sampling = [dict(temperature=1.0, seed=i), dict(temperature=0.0), dict(temperature=0.8, top_k=40, seed=i),
                    dict(temperature=1.2, top_p=0.9, repetition_penalty=1.3, seed=i), dict(temperature=1.0, seed=i,
                                                                                          ignore_eos=True)][i % 5]
        constrained.append(req(f"c{i}", ADAPTERS[i % 4], MAX_TOKENS, prompt=f"record {i}:",
                               response_format=as_format(SCHEMAS[i % len(SCHEMAS)]), **sampling))
    free = [req(f"f{i}", ADAPTERS[i % 4], 24, temperature=1.0, seed=i, ignore_eos=True) for i in range(6)]
    outputs = engine.generate(constrained[:25] + free + constrained[25:])
    for i, request in enumerate(constrained):
        out = outputs[request.request_id][-1]
        assert out.error is None and out.finish_reason is FinishReason.EOS, (i, out)
        jsonschema.validate(json.loads(out.text), SCHEMAS[i % len(SCHEMAS)])
    assert all(outputs[r.request_id][-1].completion_tokens == 24 for r in free)


def test_regex_and_json_object(demo_dir):
    engine = make_engine(demo_dir)
    pattern = r"[a-c]{2,4}-\d\d?"
    requests = [req(f"r{i}", ADAPTERS[i % 4], 32, temperature=1.0, seed=i,
                    response_format={"type": "regex", "value": pattern}) for i in range(6)]
    requests += [req(f"o{i}", ADAPTERS[i % 4], 64, temperature=1.0, seed=i,
                     response_format={"type": "json_object"}) for i in range(6)]
    outputs = {rid: outs[-1] for rid, outs in engine.generate(requests).items()}
    for i in range(6):
        assert outputs[f"r{i}"].finish_reason is FinishReason.EOS and re.fullmatch(pattern, outputs[f"r{i}"].text)
    # Any JSON object has no bound a random model must reach: those that end are objects, and the
    # others are cut at max_tokens.
    objects = [o for rid, o in outputs.items() if rid.startswith("o")]
    for out in objects:
        assert out.error is None
        if out.finish_reason is FinishReason.EOS:
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.finish_reason is FinishReason.LENGTH and out.text.startswith("{")
    assert any(out.finish_reason is FinishReason.EOS for out in objects)


def test_a_free_request_gets_the_same_text_next_to_constrained_ones(demo_dir):
    sampled = dict(temperature=0.9, top_k=50, seed=77, max_tokens=12, ignore_eos=True)
    alone = make_engine(demo_dir).generate([req("s", "chat", **sampled)])["s"][-1].text
    crowd = [req(f"c{i}", ADAPTERS[i % 4], MAX_TOKENS, temperature=1.0, seed=i, response_format=as_format(SCHEMAS[i]))
             for i in range(4)]
    together = make_engine(demo_dir).generate(crowd[:2] + [req("s", "chat", **sampled)] + crowd[2:])
    assert together["s"][-1].text == alone
    assert all(together[f"c{i}"][-1].finish_reason is FinishReason.EOS for i in range(4))


def test_each_of_n_choices_follows_the_schema_with_a_grammar_of_its_own(demo_dir):
    """Choices 1..n-1 sample their first token from choice 0's prompt (the fork): masked too."""
    engine = make_engine(demo_dir)
    (out,) = engine.generate([req("n", "sql", MAX_TOKENS, temperature=1.0, seed=3, n=4,
                                  response_format=as_format(SCHEMAS[3]))])["n"]
    assert out.error is None and len(out.choices) == 4
    for choice in out.choices:
        assert choice.finish_reason is FinishReason.EOS
        jsonschema.validate(json.loads(choice.text), SCHEMAS[3])
    assert len({choice.text for choice in out.choices}) > 1


@pytest.mark.parametrize("fmt, needle", [
    (as_format({"type": "integer", "minimum": 5, "maximum": 1}),
     "the JSON schema cannot be compiled: Invalid range: minimum greater than maximum"),
    (as_format({"type": "array", "minItems": 3, "maxItems": 1}),
     "cannot be compiled: minItems is greater than maxItems"),
    ({"type": "regex", "value": "(?<=x)y"},
     "the regular expression cannot be compiled: Regex parsing error at position 3: Lookbehind is not supported yet"),
    ({"type": "regex", "value": "[a-"}, "Unclosed '['"),
])
def test_what_does_not_compile_is_refused_before_the_request_is_queued(demo_dir, fmt, needle):
    """Compiling is part of preparing the request (on a prompt worker): the error is raised to the
    caller if the compile ended before add_request returned, else it is the request's one output;
    either way the request never reached the scheduler."""
    engine = make_engine(demo_dir)
    scheduled = []
    engine.scheduler.add = scheduled.append
    try:
        (out,) = engine.generate([req("bad", max_tokens=8, response_format=fmt)])["bad"]
        assert out.finish_reason is FinishReason.ERROR
        error = out.error
    except InvalidParameterError as raised:
        error = raised
    assert isinstance(error, InvalidParameterError) and error.field == "response_format" and needle in str(error)
    assert not scheduled and not engine.has_unfinished()
    # once compiled, a format is at hand: a request with it is prepared on the caller's thread
    good = req("good", max_tokens=8, response_format=as_format(SCHEMAS[2]))
    assert not engine.prompts.grammars.at_hand(good.params.response_format)
    engine.generate([good])
    assert engine.prompts.grammars.at_hand(good.params.response_format)
    assert engine.prompts.start(good).done()


def test_formats_compile_once_and_steps_without_one_do_no_mask_work(demo_dir, monkeypatch):
    engine = make_engine(demo_dir)
    fmt = req("x", response_format=as_format(SCHEMAS[0])).params.response_format
    assert engine.grammars.compiled(fmt) is engine.grammars.compiled(fmt)

    def no_masks(*args):
        raise AssertionError("a step without a constrained row started mask work")

    monkeypatch.setattr(grammar, "PendingMasks", no_masks)
    outputs = engine.generate([req(f"f{i}", ADAPTERS[i % 4], 6, temperature=1.0, seed=i) for i in range(4)])
    assert all(outs[-1].error is None for outs in outputs.values())


def test_bounded_strings_compile_as_json_aware_patterns():
    """xgrammar 0.2.9 lets raw control characters (mlc-ai/xgrammar#800) and surrogate code points
    into length-bounded strings: written as a pattern of characters that excludes both, they cannot
    come out (the fifty requests above hit both before)."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3},
                                               "b": {"type": ["string", "null"], "minLength": 1},
                                               "c": {"type": "integer", "maximum": 3}}}
    rewritten = json.loads(grammar._bounded_strings_as_patterns(json.dumps(schema)))
    character = r"[^\u0000-\u001f\ud800-\udfff]"
    assert rewritten["properties"]["a"] == {"type": "string", "pattern": f"^{character}{{0,3}}$"}
    assert rewritten["properties"]["b"] == {"type": ["string", "null"], "pattern": f"^{character}{{1,}}$"}
    assert rewritten["properties"]["c"] == schema["properties"]["c"]
