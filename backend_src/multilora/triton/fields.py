"""The request surface of lora_llm, declared once.

Each field is an optional input tensor of the model (name, Triton datatype, shape) and, with the
same name, a request parameter (what Triton's HTTP `generate` extension sends). Everything else
follows this table or is tested against it: the `input [...]` of both config.pbtxt files
(tests/triton/test_fields.py), the parser (request_parsing.py reads `kind` and `group`), the
client package's field list (tests/client/test_request.py), and the request table in docs/api.md.
Sampling ranges live with SamplingParams (engine/sampling_params.py, `LIMITS`).

Integers are INT64 (seed: UINT64) so that Triton never narrows them: its generate extension
converts a JSON parameter whose name is a declared input into a tensor of the declared datatype
with a plain C cast, so 4294967300 sent for an INT32 input arrived as 4.
"""
from __future__ import annotations

from dataclasses import dataclass

# How the parser treats a field.
PROMPT = "prompt"        # what to continue: text_input or messages, exactly one
REQUEST = "request"      # how to serve it: adapter, streaming, echo
SAMPLING = "sampling"    # SamplingParams fields; also accepted inside sampling_parameters
JSON = "json"            # sampling_parameters: a JSON object of sampling (and request) fields
COMMAND = "command"      # adapter management instead of generation


@dataclass(frozen=True)
class Field:
    name: str
    datatype: str  # Triton datatype of the input tensor (config.pbtxt's TYPE_STRING is BYTES)
    kind: str      # what the parser makes of it: str, strs, int, float, bool, json, messages, format
    group: str
    doc: str
    dims: tuple[int, ...] = (1,)  # after the batch dimension; (-1,) holds a list


FIELDS: tuple[Field, ...] = (
    Field("text_input", "BYTES", "str", PROMPT, "the prompt"),
    Field("messages", "BYTES", "messages", PROMPT,
          'a chat as OpenAI sends it: a JSON list of {"role", "content"} objects, rendered with the '
          "chat template and its generation prompt"),
    Field("adapter_id", "BYTES", "str", REQUEST, "adapter id: `name` or `org/name` under `adapter_dir`"),
    Field("lora_name", "BYTES", "str", REQUEST, "the same as adapter_id (Triton's vLLM backend's name)"),
    Field("max_tokens", "INT64", "int", SAMPLING, "new tokens at most"),
    Field("stream", "BOOL", "bool", REQUEST, "one response per new piece of text"),
    Field("temperature", "FP32", "float", SAMPLING, "sampling temperature"),
    Field("top_p", "FP32", "float", SAMPLING, "nucleus sampling mass"),
    Field("top_k", "INT64", "int", SAMPLING, "sample among the k most likely tokens"),
    Field("seed", "UINT64", "int", SAMPLING, "random seed of this request"),
    Field("repetition_penalty", "FP32", "float", SAMPLING, "penalty of tokens already seen"),
    Field("stop", "BYTES", "strs", SAMPLING, "stop strings", dims=(-1,)),
    Field("ignore_eos", "BOOL", "bool", SAMPLING, "keep generating past EOS"),
    Field("logprobs", "INT64", "int", SAMPLING, "each generated token's logprob, with this many top alternatives"),
    Field("prompt_logprobs", "INT64", "int", SAMPLING, "each prompt token's logprob, with this many top alternatives"),
    Field("n", "INT64", "int", SAMPLING, "choices: completions of the prompt, which is computed once"),
    Field("response_format", "BYTES", "format", SAMPLING,
          'structured output: a JSON object such as {"type": "json_schema", "json_schema": {"schema": ...}}'),
    Field("exclude_input_in_output", "BOOL", "bool", REQUEST, "leave the prompt out of the text"),
    Field("sampling_parameters", "BYTES", "json", JSON, "a JSON object of sampling fields"),
    Field("adapter_command", "BYTES", "str", COMMAND, "list, load or unload"),
    Field("management_token", "BYTES", "str", COMMAND, "the token load and unload need, if the server has one"),
)

BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
INPUT_NAMES: tuple[str, ...] = tuple(BY_NAME)


def names(*groups: str) -> tuple[str, ...]:
    """The names of the fields in `groups`, in declaration order."""
    return tuple(f.name for f in FIELDS if f.group in groups)
