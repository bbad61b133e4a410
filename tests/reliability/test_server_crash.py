"""Issue 10 item 11, the local side: tritonserver 2.51 (the bundled server) dies of one HTTP body
with JSON arrays nested 1,000,000 deep (a stack overflow in its recursive JSON parser, fixed
upstream in 26.05, which docker/ uses). Locally the launcher binds to loopback, and its supervisor
restarts a server that died, so one such request costs a restart, not the service."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from multilora.launcher import probes

pytestmark = pytest.mark.e2e
DEPTH = 1_000_000


def test_a_server_killed_by_a_deep_json_body_is_restarted(supervised_server, wait_until):
    server, supervisor = supervised_server
    first = server.process
    body = ('{"text_input": ' + "[" * DEPTH + '"x"' + "]" * DEPTH + "}").encode()
    sent_at = time.monotonic()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(urllib.request.Request(server.url + "/v2/models/lora_llm/generate", data=body),
                               timeout=60)
    wait_until(lambda: probes.generate_once(server.url, "lora_llm", timeout=5) is None, 120,
               "lora_llm serves again")
    assert first.returncode is not None and first.returncode < 0, "tritonserver 2.51 died of a signal"
    assert server.process is not first and len(supervisor.restarts) == 1
    print(f"\ntritonserver died with code {first.returncode}; serving again {time.monotonic() - sent_at:.1f} s "
          "after the request")
