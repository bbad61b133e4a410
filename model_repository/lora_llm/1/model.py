"""Triton glue for the multilora engine: parse requests, stream responses, report errors.

Everything else (scheduling, the model, adapters) lives in the `multilora` package, which is plain
Python and knows nothing about Triton.
"""
import json
import os
import queue
import threading
import uuid
from pathlib import Path

import triton_python_backend_utils as pb_utils

from multilora.config import EngineConfig
from multilora.errors import UserError
from multilora.triton.cpu_threads import start_served_engine
from multilora.triton.management import ManagementPolicy, authorize
from multilora.triton.metrics import LoraMetrics
from multilora.triton.request_parsing import INPUT_NAMES, parse_adapter_command, parse_request
from multilora.triton.responses import error_code_and_message, json_tensors, merge_pending, output_tensors

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Each is_cancelled() is a round trip to the server process. The engine acts on a cancellation
# only between steps, and a running stream gets its outputs once per step, so each unfinished
# request is asked once per step (after the sender's pass), at most every CANCEL_POLL_S and at
# least every IDLE_CANCEL_POLL_S (requests still waiting, or not streaming). See docs/design.md,
# "The served path".
CANCEL_POLL_S = 0.05
IDLE_CANCEL_POLL_S = 0.25


def _error_response(error):
    code, message = error_code_and_message(error)
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL)))


def _response(tensors):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("lora_llm must use the decoupled transaction policy")
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        config = EngineConfig.from_parameters(params, base_dir=Path(args["model_repository"]))
        self.management = ManagementPolicy.from_config(config)
        self.metrics = LoraMetrics(pb_utils, max_cpu_loras=config.max_cpu_loras)
        self.engine, threads = start_served_engine(config, events=self.metrics)  # why: cpu_threads.py
        pb_utils.Logger.log_info(f"lora_llm: the engine thread uses {threads} CPU thread(s) of {os.cpu_count()}")
        self._active = {}  # engine request id -> (response sender, adapter id)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sent = threading.Event()  # set after each pass of the sender: paces the cancellation watcher
        # The engine thread only queues outputs: each send is a round trip to the server process,
        # and the next step should not wait for them.
        self._outbox = queue.SimpleQueue()
        threading.Thread(target=self._send_outputs, daemon=True).start()
        threading.Thread(target=self._watch_cancellations, daemon=True).start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            request_id = uuid.uuid4().hex  # clients may reuse ids; the engine needs unique ones
            try:
                tensors = {}
                for name in INPUT_NAMES:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        tensors[name] = tensor.as_numpy()
                parameters = json.loads(request.parameters() or "{}")
                command = parse_adapter_command(tensors, parameters)
                if command is not None:  # answered by the engine thread, sent by the sender thread
                    authorize(command, self.management)
                    self.engine.submit_command(command.command, command.adapter_id,
                                               lambda result, error, sender=sender: self._outbox.put(
                                                   (sender, result, error)))
                    continue
                parsed = parse_request(request_id, tensors, parameters, self.engine.config.default_max_tokens)
                with self._lock:
                    self._active[request_id] = (sender, parsed.adapter_id)
                self.engine.add_request(parsed, self._on_output)
            except Exception as error:  # every request gets exactly one final response
                with self._lock:
                    self._active.pop(request_id, None)
                if not isinstance(error, UserError):
                    pb_utils.Logger.log_error(f"lora_llm: request failed: {error!r}")
                sender.send(_error_response(error), flags=FINAL)
        return None

    def _on_output(self, out):
        self._outbox.put(out)

    def _send_outputs(self):
        while True:
            items = [self._outbox.get()]
            while not self._outbox.empty():  # everything waiting goes in one pass: see merge_pending
                items.append(self._outbox.get())
            for item in merge_pending([i for i in items if i is not None]):
                try:
                    if isinstance(item, tuple):  # a management command's answer
                        sender, result, error = item
                        sender.send(_error_response(error) if error is not None
                                    else _response(json_tensors(result)), flags=FINAL)
                    else:
                        self._send(item)
                except Exception as error:  # keep sending the other requests' outputs
                    pb_utils.Logger.log_error(f"lora_llm: sending a response failed: {error!r}")
            self._sent.set()
            if None in items:
                return

    def _send(self, out):
        if not out.finished:  # only a final response frees what the cancellation watcher asks
            with self._lock:
                entry = self._active.get(out.request_id)
            if entry is not None:
                entry[0].send(_response(output_tensors(out, self.engine.vocabulary)), flags=0)
                if out.finish_reason is not None:  # one of n choices ended: its tokens count now
                    self.metrics.tokens_generated(entry[1], out.completion_tokens)
            return
        try:  # rendered before taking the lock; whatever happens, the request gets its final response
            response = _error_response(out.error) if out.error is not None \
                else _response(output_tensors(out, self.engine.vocabulary))
        except Exception as error:
            response = _error_response(error)
        # Under the lock: once the final response is sent, Triton frees the request's response
        # factory, and the cancellation watcher must not ask it anything after that.
        with self._lock:
            entry = self._active.pop(out.request_id, None)
            if entry is None:
                return
            sender, adapter_id = entry
            # Counted before the client can see the end, so its next scrape does.
            self.metrics.request_finished(adapter_id, out.completion_tokens, out.error is not None)
            sender.send(response, flags=FINAL)

    def _watch_cancellations(self):
        while not self._stop.wait(CANCEL_POLL_S):
            self._sent.wait(IDLE_CANCEL_POLL_S - CANCEL_POLL_S)
            self._sent.clear()
            with self._lock:
                request_ids = list(self._active)
            for request_id in request_ids:
                with self._lock:  # one request at a time, and only while its final response is unsent
                    entry = self._active.get(request_id)
                    cancelled = entry is not None and entry[0].is_cancelled()
                if cancelled:
                    self.engine.cancel(request_id)

    def finalize(self):
        self._stop.set()
        self.engine.shutdown()
        self._outbox.put(None)
