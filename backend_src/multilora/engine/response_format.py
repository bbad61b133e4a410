"""What a request's output must look like: OpenAI's `response_format`, TGI's `grammar`, checked where
it enters the engine.

Three kinds: `json_object` (any JSON object), `json_schema` (a JSON Schema) and `regex` (the whole
output matches it). The shape is checked here, a schema is checked against the JSON Schema
metaschema (with `jsonschema`), and a schema that uses a keyword the grammar engine does not
enforce is refused by name: a client must never get output that does not follow the schema it
gave. Compiling into a grammar is engine/grammar.py's job; it reports what only the compiler finds
(an unsupported regex construct, min above max).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema

from ..errors import InvalidParameterError

FIELD = "response_format"
MAX_FORMAT_BYTES = 64 * 1024  # the JSON text of a response_format, schema included
ANY_OBJECT = '{"type": "object"}'  # json_object: what OpenAI's JSON mode gives, always an object

# Keywords xgrammar 0.2 accepts but does not enforce (generated text can break them; measured
# with random walks under the grammar), with the values that are harmless. It also ignores
# minLength / maxLength next to a pattern or format, and all but one schema of an allOf.
UNENFORCED: dict[str, tuple[Any, ...]] = {
    "not": (), "if": (), "then": (), "else": (), "contains": (), "minContains": (), "maxContains": (),
    "dependentRequired": (), "dependentSchemas": (), "dependencies": (), "uniqueItems": (False,),
}
# Where a schema holds subschemas: under a map of names, as one schema, or as a list of them.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_ONE = ("additionalProperties", "items", "additionalItems", "propertyNames", "unevaluatedItems",
               "unevaluatedProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")


@dataclass(frozen=True)
class ResponseFormat:
    """A constraint on the generated text. Hashable: the grammar cache's key."""

    kind: str  # "json_object" | "json_schema" | "regex"
    value: str = ""  # json_schema: the schema as JSON text (its key order kept: it is the output's); regex: the pattern

    @classmethod
    def parse(cls, spec: Any) -> ResponseFormat | None:
        """From a request's response_format object; None for `{"type": "text"}` (no constraint).

        `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"schema": {...}, "name",
        "description", "strict"}}` (OpenAI's) or `{"type": "regex", "value": "..."}`."""
        if not isinstance(spec, dict):
            raise InvalidParameterError(FIELD, f'must be a JSON object such as {{"type": "json_object"}}, '
                                               f'got {spec!r:.80}')
        if len(json.dumps(spec)) > MAX_FORMAT_BYTES:
            raise InvalidParameterError(FIELD, f"is longer than {MAX_FORMAT_BYTES} bytes")
        kind = spec.get("type")
        allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"},
                   "regex": {"type", "value"}}
        if kind not in allowed:
            raise InvalidParameterError(FIELD, f"'type' must be one of {', '.join(allowed)}, got {kind!r}")
        _only(spec, allowed[kind], FIELD)
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object", ANY_OBJECT)
        if kind == "regex":
            pattern = spec.get("value")
            if not isinstance(pattern, str) or not pattern:
                raise InvalidParameterError(FIELD, "'value' must be a non-empty string (the regular expression)")
            return cls("regex", pattern)
        described = spec.get("json_schema")
        if not isinstance(described, dict):
            raise InvalidParameterError(FIELD, "'json_schema' must be an object holding 'schema'")
        _only(described, {"schema", "name", "description", "strict"}, f"{FIELD}.json_schema")
        if "schema" not in described:  # optional in OpenAI's API: then any JSON object
            return cls("json_object", ANY_OBJECT)
        schema = described["schema"]
        check_schema(schema)
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))


def check_schema(schema: Any) -> None:
    """A JSON Schema the grammar can enforce, or InvalidParameterError saying what is wrong and where."""
    if not isinstance(schema, dict):
        raise InvalidParameterError(FIELD, f"the JSON schema must be an object, got {schema!r:.80}")
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        raise InvalidParameterError(FIELD, f"the JSON schema is invalid at {_where(error.path)}: "
                                           f"{error.message}") from None
    for node, path in walk(schema):
        for keyword, harmless in UNENFORCED.items():
            if keyword in node and node[keyword] not in harmless:
                raise InvalidParameterError(FIELD, f"the JSON schema uses '{keyword}' at {_where(path)}, which "
                                                   "structured output cannot enforce; remove it")
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            raise InvalidParameterError(FIELD, f"the JSON schema uses 'allOf' with {len(node['allOf'])} schemas "
                                               f"at {_where(path)}; structured output enforces at most one")
        lengths = [k for k in ("minLength", "maxLength") if k in node]
        shapes = [k for k in ("pattern", "format") if k in node]
        if lengths and shapes:
            raise InvalidParameterError(FIELD, f"the JSON schema combines '{lengths[0]}' with '{shapes[0]}' at "
                                               f"{_where(path)}, which structured output cannot enforce together; "
                                               f"put the length into the pattern instead")


def walk(schema: dict) -> Iterator[tuple[dict, tuple]]:
    """Every (sub)schema object in `schema` with its path, the root first (boolean schemas left out)."""
    stack: list[tuple[Any, tuple]] = [(schema, ())]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node, path
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack += [(sub, path + (key, name)) for name, sub in node[key].items()]
        for key in _SCHEMA_ONE:
            stack.append((node.get(key), path + (key,)))
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack += [(sub, path + (key, i)) for i, sub in enumerate(node[key])]


def _only(spec: dict, keys: set[str], where: str) -> None:
    unknown = sorted(set(spec) - keys)
    if unknown:
        raise InvalidParameterError(FIELD, f"unknown key(s) {unknown} in {where}; allowed: {', '.join(sorted(keys))}")


def _where(path) -> str:
    return "/" + "/".join(str(p) for p in path) if path else "the top level"
