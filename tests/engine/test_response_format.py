"""response_format objects: the shapes accepted, and schemas refused by name before anything compiles."""
from __future__ import annotations

import json

import pytest

from multilora.engine.response_format import ANY_OBJECT, ResponseFormat
from multilora.engine.sampling_params import SamplingParams
from multilora.errors import InvalidParameterError

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}


def test_the_accepted_shapes():
    assert ResponseFormat.parse({"type": "text"}) is None
    assert ResponseFormat.parse({"type": "json_object"}) == ResponseFormat("json_object", ANY_OBJECT)
    parsed = ResponseFormat.parse({"type": "json_schema",
                                   "json_schema": {"name": "x", "strict": True, "schema": SCHEMA}})
    assert parsed.kind == "json_schema" and json.loads(parsed.value) == SCHEMA
    assert list(json.loads(parsed.value)["properties"]) == ["b", "a"]  # the order is the output's: kept
    assert ResponseFormat.parse({"type": "json_schema", "json_schema": {"name": "any"}}).kind == "json_object"
    assert ResponseFormat.parse({"type": "regex", "value": r"\d+"}) == ResponseFormat("regex", r"\d+")
    # equal formats are equal keys (the compile cache's)
    assert ResponseFormat.parse({"type": "json_schema", "json_schema": {"schema": SCHEMA}}) == parsed


def test_sampling_params_take_the_request_object():
    params = SamplingParams(response_format={"type": "regex", "value": "ab"})
    assert params.response_format == ResponseFormat("regex", "ab")
    assert SamplingParams(response_format={"type": "text"}).response_format is None


@pytest.mark.parametrize("spec, needle", [
    ("json", "must be a JSON object"),
    ({"type": "yaml"}, "'type' must be one of text, json_object, json_schema, regex, got 'yaml'"),
    ({"type": "json_object", "schema": {}}, "unknown key(s) ['schema'] in response_format"),
    ({"type": "json_schema"}, "'json_schema' must be an object holding 'schema'"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "extra": 1}},
     "unknown key(s) ['extra'] in response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, "the JSON schema must be an object"),
    ({"type": "regex"}, "'value' must be a non-empty string"),
    ({"type": "regex", "value": ""}, "'value' must be a non-empty string"),
    ({"type": "regex", "value": "a" * 70000}, "is longer than 65536 bytes"),
])
def test_bad_shapes_are_refused_by_name(spec, needle):
    with pytest.raises(InvalidParameterError) as caught:
        ResponseFormat.parse(spec)
    assert caught.value.field == "response_format" and needle in str(caught.value)


@pytest.mark.parametrize("schema, needle", [
    # the metaschema (jsonschema), with where
    ({"type": "foo"}, "the JSON schema is invalid at /type: 'foo' is not valid"),
    ({"type": "object", "properties": {"a": {"minimum": "x"}}},
     "invalid at /properties/a/minimum: 'x' is not of type 'number'"),
    ({"type": "array", "maxItems": -1}, "invalid at /maxItems"),
    # keywords the grammar would not enforce
    ({"not": {"type": "string"}}, "uses 'not' at the top level, which structured output cannot enforce"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "'uniqueItems' at /properties/a"),
    ({"type": "array", "items": {"if": {}, "then": {}}}, "'if' at /items"),
    ({"$defs": {"x": {"contains": {}}}, "$ref": "#/$defs/x"}, "'contains' at /$defs/x"),
    ({"anyOf": [{"type": "object", "dependentRequired": {"a": ["b"]}}]}, "'dependentRequired' at /anyOf/0"),
    ({"allOf": [{"type": "integer"}, {"maximum": 3}]}, "'allOf' with 2 schemas at the top level"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "combines 'maxLength' with 'pattern'"),
    ({"type": "string", "format": "date", "minLength": 3}, "combines 'minLength' with 'format'"),
])
def test_schemas_that_are_invalid_or_not_enforceable_are_refused_naming_the_problem(schema, needle):
    with pytest.raises(InvalidParameterError) as caught:
        ResponseFormat.parse({"type": "json_schema", "json_schema": {"schema": schema}})
    assert caught.value.field == "response_format" and needle in str(caught.value)


def test_property_names_that_are_keywords_are_not_keywords():
    schema = {"type": "object", "properties": {"not": {"type": "boolean"}, "if": {"type": "string", "maxLength": 2}},
              "uniqueItems": False}
    assert ResponseFormat.parse({"type": "json_schema", "json_schema": {"schema": schema}}).kind == "json_schema"
