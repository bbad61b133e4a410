"""The request fields are declared once (multilora.triton.fields); the rest must agree with them."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from multilora.engine.sampling_params import LIMITS, SamplingParams
from multilora.triton import request_parsing
from multilora.triton.fields import FIELDS, INPUT_NAMES, SAMPLING, names

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [REPO / "model_repository/lora_llm/config.pbtxt", REPO / "docker/model_repository/lora_llm/config.pbtxt"]
DATATYPES = {"str": {"BYTES"}, "strs": {"BYTES"}, "json": {"BYTES"}, "messages": {"BYTES"}, "format": {"BYTES"},
             "bool": {"BOOL"}, "int": {"INT64", "UINT64"}, "float": {"FP32"}}


def _pbtxt_type(datatype: str) -> str:
    """config.pbtxt's name of a Triton datatype."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


@pytest.mark.parametrize("path", CONFIGS, ids=["model_repository", "docker"])
def test_config_pbtxt_inputs_are_the_declared_fields(path):
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    declared = [(f.name, _pbtxt_type(f.datatype), list(f.dims), True) for f in FIELDS]
    inputs = [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims), i.optional) for i in config.input]
    assert inputs == declared


def test_every_kind_has_a_datatype_that_holds_it_unnarrowed():
    for field in FIELDS:
        assert field.datatype in DATATYPES[field.kind], field.name
    assert not [f.name for f in FIELDS if f.datatype in ("INT32", "INT16", "INT8")], "Triton narrows JSON ints"


def test_sampling_fields_are_exactly_sampling_params():
    assert set(names(SAMPLING)) == {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(LIMITS) <= set(names(SAMPLING))


def test_the_parser_and_model_py_read_the_declaration():
    assert request_parsing.INPUT_NAMES is INPUT_NAMES
    model_py = (REPO / "model_repository/lora_llm/1/model.py").read_text()
    assert "for name in INPUT_NAMES:" in model_py


def test_api_docs_request_table_lists_every_field_with_its_datatype():
    api = (REPO / "docs" / "api.md").read_text()
    section = api.split("\n## Request fields\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)`[^|]*\| (\w+) ", section, flags=re.M))
    assert rows == {f.name: f.datatype for f in FIELDS if f.name != "lora_name"}
    for name, limit in LIMITS.items():
        assert limit.describe().split(" in ", 1)[1] in section, name
