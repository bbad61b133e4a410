"""Who may use adapter_command: off / read (default) / on, and an optional token for load and unload."""
from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from multilora.config import EngineConfig
from multilora.errors import ConfigError, InvalidParameterError
from multilora.triton.management import ManagementPolicy, authorize
from multilora.triton.request_parsing import AdapterCommand

LIST, LOAD, UNLOAD = AdapterCommand("list", None), AdapterCommand("load", "sql"), AdapterCommand("unload", "sql")


def config(**params: str) -> EngineConfig:
    return EngineConfig.from_parameters({"base_model": "/models/base", **params})


def test_by_default_anyone_may_list_and_nobody_may_load_or_unload():
    policy = ManagementPolicy.from_config(config())
    assert policy == ManagementPolicy("read", None)
    authorize(LIST, policy)
    for command in (LOAD, UNLOAD):
        with pytest.raises(InvalidParameterError) as err:
            authorize(command, policy)
        assert str(err.value) == (f"invalid 'adapter_command': '{command.command}' is disabled on this server: its "
                                  "'management' parameter is 'read' (list only); 'on' allows load and unload")


def test_off_refuses_even_list():
    with pytest.raises(InvalidParameterError, match="adapter management is disabled.*'management' is 'off'"):
        authorize(LIST, ManagementPolicy.from_config(config(management="off")))


def test_on_without_a_token_allows_everything():
    policy = ManagementPolicy.from_config(config(management="on"))
    for command in (LIST, LOAD, UNLOAD):
        authorize(command, policy)


def test_a_token_guards_load_and_unload_but_not_list():
    policy = ManagementPolicy.from_config(config(management="on", management_token_env="TOKEN_VAR"),
                                          environ={"TOKEN_VAR": "s3cret"})
    assert policy.token == "s3cret"
    authorize(LIST, policy)
    authorize(AdapterCommand("unload", "sql", "s3cret"), policy)
    with pytest.raises(InvalidParameterError, match="'management_token': missing: this server requires"):
        authorize(UNLOAD, policy)
    with pytest.raises(InvalidParameterError, match="'management_token': wrong: .* adapter_command 'load'"):
        authorize(AdapterCommand("load", "sql", "s3cre"), policy)


@pytest.mark.parametrize("params, needle", [
    ({"management": "yes"}, "parameter 'management' must be off, read or on, got 'yes'"),
    ({"management_token_env": "T"},
     "parameter 'management_token_env' guards load and unload, which need 'management' 'on'"),
    ({"management": "on", "management_token_env": "1-bad"}, "must name an environment variable, got '1-bad'"),
])
def test_bad_management_parameters_stop_the_model(params, needle):
    with pytest.raises(ConfigError) as err:
        config(**params)
    assert needle in str(err.value)


def test_a_token_variable_that_is_not_set_stops_the_model():
    with pytest.raises(ConfigError, match="'management_token_env': environment variable 'NOPE' is not set or empty"):
        ManagementPolicy.from_config(config(management="on", management_token_env="NOPE"), environ={})


def test_the_container_config_lets_anyone_list_and_nobody_unload():
    path = Path(__file__).resolve().parents[2] / "docker/model_repository/lora_llm/config.pbtxt"
    parameters = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig()).parameters
    policy = ManagementPolicy.from_config(config(**{k: v.string_value for k, v in parameters.items()
                                                    if k in ("management", "management_token_env")}))
    assert policy == ManagementPolicy("read", None)
