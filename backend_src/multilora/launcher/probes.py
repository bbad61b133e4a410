"""Questions to a running tritonserver over HTTP: is it ready, can a model answer, is anything in
flight, which adapters does it serve. Shared by the server's start and stop, the supervisor, the
health check and the start banner."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

PROBE_PROMPT = "ping"
# Engine gauges of lora_llm (multilora.triton.metrics) and Triton's own queue gauge.
SCHEDULER_GAUGE = "lora_scheduler_state"
QUEUE_GAUGE = "nv_inference_pending_request_count"


def http_status(url: str, timeout: float, body: bytes | None = None) -> int | None:
    """The HTTP status of GET (or POST with `body`) `url`; None when nothing answered."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):  # refused, reset, timed out
        return None


def server_ready(url: str, timeout: float = 2.0) -> bool:
    return http_status(url + "/v2/health/ready", timeout) == 200


def generate_once(url: str, model: str, timeout: float) -> str | None:
    """Generate one token on the base model; None when that worked, else why it did not.

    A real request through the server, the python backend stub and the engine: what the
    server's own health endpoints do not check (tritonserver 2.51 stays ready with a dead stub).
    """
    body = json.dumps({"text_input": PROBE_PROMPT, "parameters": {"max_tokens": 1}}).encode()
    request = urllib.request.Request(f"{url}/v2/models/{model}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as e:
        return f"{model} answered HTTP {e.code}: {_error_text(e)}"
    except (urllib.error.URLError, OSError) as e:
        return f"no answer from {url} within {timeout:g} s: {getattr(e, 'reason', e)}"
    except ValueError:
        return f"{model} answered with something that is not JSON"
    if "text_output" not in answer:
        return f"{model} answered without text_output: {str(answer)[:200]}"
    return None


def served_adapters(url: str, model: str, timeout: float) -> list[str]:
    """The adapter ids in the model's adapter_dir, as its `adapter_command: list` answers them;
    [] when it has none or does not answer (`management` off, another model)."""
    body = json.dumps({"parameters": {"adapter_command": "list"}}).encode()
    request = urllib.request.Request(f"{url}/v2/models/{model}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            disk = json.loads(json.load(r)["text_output"]).get("disk")
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [a for a in disk if isinstance(a, str)] if isinstance(disk, list) else []


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read()).get("error", "")[:300]
    except (ValueError, AttributeError, OSError):
        return error.reason


def gauges(metrics_url: str, names: tuple[str, ...], timeout: float = 1.0) -> dict[str, float] | None:
    """`{'name{labels}': value}` for the named metrics; None when the metrics port is silent."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    values = {}
    for line in text.splitlines():
        if line.startswith(names):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def is_idle(metrics_url: str) -> bool | None:
    """True when nothing is queued in Triton and the engine runs and waits for nothing; None
    when that cannot be known (metrics off, or a model without our engine gauges)."""
    values = gauges(metrics_url, (SCHEDULER_GAUGE, QUEUE_GAUGE)) or {}
    engine = [v for k, v in values.items()
              if k.startswith(SCHEDULER_GAUGE) and ('"running"' in k or '"waiting"' in k)]
    if not engine:
        return None
    queued = [v for k, v in values.items() if k.startswith(QUEUE_GAUGE)]
    return not any(engine + queued)
