import logging

import pytest

from multilora.config import EngineConfig, kv_cache_budget
from multilora.errors import ConfigError


def test_parameters_are_typed_and_relative_paths_resolved(tmp_path):
    (tmp_path / "demo" / "base").mkdir(parents=True)
    config = EngineConfig.from_parameters({"base_model": "demo/base", "max_num_seqs": " 8 ", "adapter_dir": "a",
                                           "allow_hub_download": "true"}, base_dir=tmp_path)
    assert config.base_model == str((tmp_path / "demo" / "base").resolve())
    assert config.max_num_seqs == 8 and config.allow_hub_download is True


def test_hub_ids_stay_hub_ids(tmp_path):
    config = EngineConfig.from_parameters({"base_model": "meta-llama/Llama-3.1-8B@main"}, base_dir=tmp_path)
    assert config.base_model == "meta-llama/Llama-3.1-8B@main"


@pytest.mark.parametrize("params, needle", [
    ({}, "'base_model' is required"),
    ({"base_model": "x", "max_num_seq": "4"}, "unknown parameter(s) ['max_num_seq']"),
    ({"base_model": "x", "max_num_seqs": "many"}, "'max_num_seqs': 'many' is not a valid int"),
    ({"base_model": "x", "max_num_seqs": "0"}, "'max_num_seqs' must be >= 1"),
    ({"base_model": "x", "dtype": "fp8"}, "'dtype' must be auto, float32"),
    ({"base_model": "x", "device": "tpu"}, "'device' must be auto, cpu or cuda"),
    ({"base_model": "x", "cuda_kernels": "yes"}, "'cuda_kernels' must be auto, on or off, got 'yes'"),
    ({"base_model": "x", "lora_kernels": "yes"}, "'cuda_kernels' must be auto, on or off, got 'yes'"),
    ({"base_model": "x", "lora_kernels": "off", "cuda_kernels": "off"},
     "'lora_kernels' and 'cuda_kernels' are both set"),
    ({"base_model": "x", "cuda_graphs": "yes"}, "'cuda_graphs' must be auto, on or off, got 'yes'"),
    ({"base_model": "x", "cuda_graphs": "on", "cuda_kernels": "off"},
     "'cuda_graphs' on needs our CUDA kernels: set 'cuda_kernels' to auto or on"),
    ({"base_model": "x", "kv_cache_memory": "lots"}, "'kv_cache_memory'"),
    ({"base_model": "x", "max_loras": "9", "max_cpu_loras": "4"}, "'max_cpu_loras' must be >= 'max_loras'"),
    ({"base_model": "x", "max_loras": "0"}, "'max_loras' must be auto or an integer >= 1, got '0'"),
    ({"base_model": "x", "max_loras": "many"}, "'max_loras' must be auto or an integer >= 1, got 'many'"),
    ({"base_model": "x", "adapter_load_stall_s": "0"}, "'adapter_load_stall_s' must be > 0"),
    ({"base_model": "x", "max_stalled_adapter_loads": "-1"}, "'max_stalled_adapter_loads' must be >= 0, got -1"),
    ({"base_model": "x", "adapter_check_interval_s": "-1"}, "'adapter_check_interval_s' must be >= 0"),
])
def test_bad_parameters_fail_at_start_with_the_parameter_named(params, needle):
    with pytest.raises(ConfigError) as err:
        EngineConfig.from_parameters(params)
    assert needle in str(err.value)


def test_the_old_name_of_cuda_kernels_still_works_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="multilora.config"):
        config = EngineConfig.from_parameters({"base_model": "x", "lora_kernels": "off"})
    assert config.cuda_kernels == "off"
    (record,) = caplog.records
    assert "'lora_kernels' is deprecated" in record.getMessage() and "'cuda_kernels'" in record.getMessage()


@pytest.mark.parametrize("spec, expected", [("0.5", 500), ("1", 1000), ("512MiB", 512 * 2**20),
                                            ("2GB", 2 * 10**9), ("4096", 4096)])
def test_kv_cache_budget(spec, expected):
    assert kv_cache_budget(spec, total_bytes=1000) == expected


def test_max_loras_is_auto_by_default_or_a_number():
    assert EngineConfig(base_model="x").fixed_max_loras is None
    assert EngineConfig.from_parameters({"base_model": "x", "max_loras": "12"}).fixed_max_loras == 12
    assert EngineConfig(base_model="x", max_loras=3).fixed_max_loras == 3  # benchmarks pass numbers
