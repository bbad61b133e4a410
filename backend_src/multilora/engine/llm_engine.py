"""The engine: one base model, many adapters, a loop that steps a continuously changing batch.

Callers (the Triton glue, tests, benchmarks) add requests and management commands from any
thread; both go through the engine's inbox, and only the engine thread (the loop, or the caller of
`step` when there is no loop) touches the engine's state: the scheduler, the KV cache, the running
rows, the adapter tiers and slots. Outputs and command answers come back through callbacks.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from ..config import EngineConfig
from ..errors import GenerationError, RequestTimeoutError, UserError
from ..events import EngineEvents, EngineSnapshot
from .assembly import assemble
from .commands import Command, Reply
from .detokenizer import TextStream
from .logprobs import TokenLogprob
from .prompts import Prompt
from .sequence import FinishReason, GenerationRequest, Sequence, SequenceGroup, SequenceOutput
from .snapshot import take_snapshot

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, events: EngineEvents | None = None) -> None:
        self.config = config
        self.events = events or EngineEvents()
        self._inbox: list[Sequence | Command] = []  # a request is its first choice (SequenceGroup)
        self._requests: dict[str, SequenceGroup] = {}  # a directory for cancel(); entries added and removed under _wake
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._preparing = 0  # requests being prepared off their caller's thread (Prompts.start)
        self._last_snapshot: EngineSnapshot | None = None
        # Prompt tokens whose K/V this engine computed (engine thread; others may read it): a
        # prompt that a request's n choices share counts once.
        self.prompt_tokens_computed = 0
        parts = assemble(config, self.events, on_adapter_loaded=self._wake_up)
        self.device, self.dtype, self.max_model_len = parts.device, parts.dtype, parts.max_model_len
        self.tokenizer, self.eos_ids, self.chat_templates = parts.tokenizer, parts.eos_ids, parts.chat_templates
        self.grammars = parts.grammars
        self.vocabulary = parts.vocabulary
        self.model, self.kv_cache, self.runner = parts.model, parts.kv_cache, parts.runner
        self.slots, self.adapters, self.commands = parts.slots, parts.adapters, parts.commands
        self.prompts, self.scheduler = parts.prompts, parts.scheduler
        log.info("engine ready: %s (%s) on %s (%s), KV cache %d blocks of %d tokens", parts.model_dir,
                 self.model.family.name, self.device, self.dtype, self.kv_cache.num_blocks, self.kv_cache.block_size)
        self._report_state()  # the idle state is readable before the first request

    # ---- requests and commands (any thread) ----
    def add_request(self, request: GenerationRequest, on_output: Callable[[SequenceOutput], None]) -> None:
        """Render, tokenize and queue a request without holding up the caller's other requests.

        Chat messages are rendered with the request's adapter's chat template (or the base
        model's), and the template's end-of-turn tokens stop the request. A request with n choices
        is n sequences that share one prefill (SequenceGroup). What takes time is done off this
        thread (prompts.py): a long prompt is tokenized by a prompt worker, an adapter's template
        files are read in a thread of their own. A UserError found here (a prompt too long by its
        length, a short prompt's problems) is raised; one found off this thread ends the request
        through `on_output`, as its final output with the error."""
        prepared = self.prompts.start(request)
        if prepared.done():
            self._queue(prepared.result(), on_output)
            return
        with self._wake:
            self._preparing += 1
        prepared.add_done_callback(lambda done: self._prepared(done, request, on_output))

    def _prepared(self, done: Future, request: GenerationRequest, on_output: Callable[[SequenceOutput], None]) -> None:
        """A preparation ended off the caller's thread: queue the request, or end it with the error."""
        try:
            self._queue(done.result(), on_output)
        except Exception as error:
            if not isinstance(error, UserError):
                log.error("request %s: preparing it failed", request.request_id, exc_info=error)
            on_output(SequenceOutput(request.request_id, "", True, FinishReason.ERROR, error=error))
        finally:
            with self._wake:
                self._preparing -= 1
                self._wake.notify()

    def _queue(self, prompt: Prompt, on_output: Callable[[SequenceOutput], None]) -> None:
        request = prompt.request
        seq = self._sequence(prompt, on_output, 0)
        if self.config.request_timeout_s:
            seq.deadline = seq.arrival_time + self.config.request_timeout_s
        group = SequenceGroup([seq] + [self._sequence(prompt, on_output, i) for i in range(1, request.params.n)])
        with self._wake:
            self._requests[request.request_id] = group
            self._inbox.append(seq)
            self._wake.notify()

    def _sequence(self, prompt: Prompt, on_output: Callable[[SequenceOutput], None], index: int) -> Sequence:
        """Choice `index` of a request: its own text stream (stop strings), seed and grammar."""
        grammar = None if prompt.format is None else prompt.format.start(self.eos_ids | prompt.stop_ids)
        return Sequence(prompt.request, prompt.token_ids,
                        TextStream(self.tokenizer, prompt.token_ids, prompt.request.params.stop),
                        on_output, stop_ids=prompt.stop_ids, index=index, grammar=grammar)

    def cancel(self, request_id: str) -> None:
        """Ask for a request to stop; every choice ends within one step with finish_reason 'cancelled'."""
        with self._wake:
            group = self._requests.get(request_id)
            if group is not None:
                for seq in group.choices:
                    seq.cancelled = True
                self._wake.notify()

    def submit_command(self, command: str, adapter_id: str | None, reply: Reply) -> None:
        """The adapter management API (list | load | unload), answered through `reply(result, error)`
        from the engine thread, in order with the requests around it."""
        with self._wake:
            self._inbox.append(Command(command, adapter_id, reply))
            self._wake.notify()

    def manage(self, command: str, adapter_id: str | None = None, timeout: float | None = None) -> dict:
        """`submit_command`, waiting for the answer (steps the engine itself when no loop runs)."""
        answer: Future = Future()
        self.submit_command(command, adapter_id, lambda result, error: (
            answer.set_exception(error) if error is not None else answer.set_result(result)))
        deadline = time.monotonic() + (timeout if timeout is not None else self.config.adapter_load_timeout_s + 5)
        while self._thread is None and not answer.done() and time.monotonic() < deadline:
            self.step()
            time.sleep(0.001)
        return answer.result(timeout=max(0.0, deadline - time.monotonic()))

    # ---- the loop ----
    def start(self, torch_threads: int | None = None) -> None:
        """Run the engine in its own loop thread; with `torch_threads`, that thread sets torch's
        thread count before its first step (why the server wants that: triton/cpu_threads.py)."""
        self._thread = threading.Thread(target=self._loop, args=(torch_threads,), name="engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self.prompts.close()
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout=30)

    def _wake_up(self) -> None:
        with self._wake:
            self._wake.notify()

    def _loop(self, torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        while True:
            with self._wake:
                while not self._stopping and not self._inbox and not self.scheduler.running:
                    if self.scheduler.waiting or self.commands.loading:  # waiting on loads: poll their timeouts
                        self._wake.wait(timeout=0.05)
                        break
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug must not leave clients hanging: end every request
                log.exception("engine step failed")
                self._fail_everything(exc)

    def _fail_everything(self, exc: Exception) -> None:
        with self._wake:
            unfinished = list(self._requests.values())
        for group in unfinished:
            self._finish(group.choices[0], FinishReason.ERROR, error=exc)
        self.scheduler.waiting.clear()
        self._report_state()

    def generate(self, requests: list[GenerationRequest]) -> dict[str, list[SequenceOutput]]:
        """Run requests to completion in the calling thread (tests, benchmarks; not with start())."""
        outputs: dict[str, list[SequenceOutput]] = {r.request_id: [] for r in requests}
        for request in requests:
            self.add_request(request, lambda out: outputs[out.request_id].append(out))
        while self.has_unfinished():
            self.step()
            with self._wake:  # only preparations left: wait for one to end instead of stepping
                if self._preparing and not self._inbox and not self.scheduler.has_work and not self.commands.loading:
                    self._wake.wait(0.05)
        return outputs

    def has_unfinished(self) -> bool:
        with self._wake:
            return (bool(self._inbox) or self.scheduler.has_work or bool(self.commands.loading)
                    or bool(self._preparing))

    def step(self) -> None:
        """One engine iteration: take the inbox, advance adapter loads, schedule, run, sample."""
        self._take_inbox()
        self.commands.forget(self.adapters.poll(protected=set(self.slots.resident())))
        self.commands.answer_loads()
        now = time.monotonic()
        for seq in [s for s in self.scheduler.running if s.cancelled or now > s.deadline]:
            if seq.cancelled:
                self._finish(seq, FinishReason.CANCELLED)
            else:
                self._finish(seq, FinishReason.ERROR, error=RequestTimeoutError(
                    f"the request ran past request_timeout_s ({self.config.request_timeout_s:g} s)"))
        scheduled = self.scheduler.schedule()
        for seq in scheduled.admitted:
            self.runner.rows.add(seq)
        for seq in scheduled.cancelled:
            self._finish(seq, FinishReason.CANCELLED)
        for seq, error in scheduled.failed:
            self._finish(seq, FinishReason.ERROR, error=error)
        if scheduled.chunks:
            out = self.runner.execute(scheduled.chunks)
            for seq, n in scheduled.chunks:
                self.prompt_tokens_computed += max(0, min(n, len(seq.prompt_ids) - seq.num_computed))
                seq.num_computed += n
            for seq, found in out.prompt_logprobs:
                seq.prompt_logprobs += found
            for i, seq in enumerate(out.ready):
                self._advance(seq, out.sampled.token_list[i], out.sampled.errors[i], out.logprobs[i])
        self._report_state()

    def _take_inbox(self) -> None:
        with self._wake:
            inbox, self._inbox = self._inbox, []
        for item in inbox:
            if isinstance(item, Command):
                self.commands.start(item)
                continue
            if item.request.adapter_id:
                try:
                    item.adapter_future = self.adapters.request(item.request.adapter_id)
                except UserError as error:
                    self._finish(item, FinishReason.ERROR, error=error)
                    continue
            self.scheduler.add(item)

    def _advance(self, seq: Sequence, token: int, error: str | None, logprobs: TokenLogprob | None) -> None:
        """Append one sampled token; a failure here ends this request alone."""
        if seq.finish_reason is not None:
            return  # ended in this step by another choice's error
        if error is not None:
            self._finish(seq, FinishReason.ERROR, error=GenerationError(error))
            return
        try:
            if logprobs is not None:
                seq.logprobs.append(logprobs)
            self._append_token(seq, token)
        except Exception as exc:
            log.exception("request %s: could not append token %d", seq.request.request_id, token)
            self._finish(seq, FinishReason.ERROR, error=GenerationError(f"{type(exc).__name__}: {exc}"))

    def _report_state(self) -> None:
        """Every step: the snapshot that metrics publish, reported only when it changed (each
        published value costs the Triton glue a round trip to the server process)."""
        snapshot = take_snapshot(self.scheduler, self.kv_cache, self.slots, self.adapters)
        if snapshot != self._last_snapshot:
            self._last_snapshot = snapshot
            self.events.state(snapshot)

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.token_times.append(time.monotonic())
        seq.token_ids.append(token)
        if seq.grammar is not None and not seq.grammar.accept(token):
            raise GenerationError(f"token {token} does not follow the request's response_format")
        if (token in self.eos_ids or token in seq.stop_ids) and not seq.params.ignore_eos or \
                seq.grammar is not None and seq.grammar.ended:  # a complete grammar allows only stop tokens
            self._finish(seq, FinishReason.EOS)
            return
        piece = seq.text_stream.push(token)
        if seq.text_stream.stopped:
            self._finish(seq, FinishReason.STOP, piece)
        elif seq.num_generated >= seq.params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish(seq, FinishReason.LENGTH, piece)
        elif piece and seq.request.stream:
            logprobs, prompt_logprobs = seq.unsent_logprobs()
            seq.on_output(SequenceOutput(seq.request.request_id, piece, False, logprobs=logprobs,
                                         prompt_logprobs=prompt_logprobs, index=seq.index))

    def _finish(self, seq: Sequence, reason: FinishReason, piece: str = "", error: Exception | None = None) -> None:
        """End a choice; a cancellation or an error ends every choice of its request. The request
        ends (one final output) with its last choice; an error is that output, alone."""
        group = seq.group
        ending = [seq] if reason not in (FinishReason.CANCELLED, FinishReason.ERROR) else \
            [s for s in group.choices if s.finish_reason is None]
        for choice in ending:
            self.scheduler.retire(choice)
            self.runner.rows.remove(choice)
            choice.finish_reason = reason
        if not group.finished:
            self._send_choice(seq, reason, piece, last=False)
            return
        with self._wake:
            if self._requests.pop(seq.request.request_id, None) is None:
                return  # already ended (e.g. by the fault handler)
        if error is not None:  # its tokens: those of the choices whose ends were not sent
            unsent = ending if seq.request.stream else group.choices
            seq.on_output(SequenceOutput(seq.request.request_id, self._text(seq, piece), True, reason,
                                         len(seq.prompt_ids), sum(s.num_generated for s in unsent), error,
                                         seq.token_times, seq.arrival_time, index=seq.index))
            return
        for choice in ending:
            self._send_choice(choice, reason, piece if choice is seq else "", last=choice is ending[-1])

    def _send_choice(self, seq: Sequence, reason: FinishReason, piece: str, last: bool) -> None:
        """The output that ends a choice (`last`: the request's final one). A non-streamed
        request with n > 1 keeps its choices' outputs and sends them together, as one."""
        piece += seq.text_stream.finish()
        logprobs, prompt_logprobs = seq.unsent_logprobs()
        request = seq.request
        out = SequenceOutput(request.request_id, self._text(seq, piece), last, reason, len(seq.prompt_ids),
                             seq.num_generated, None, seq.token_times, seq.arrival_time, logprobs, prompt_logprobs,
                             seq.index)
        if request.stream or request.params.n == 1:
            seq.on_output(out)
            return
        group = seq.group
        group.ended.append(dataclasses.replace(out, finished=False))
        if last:  # the prompt's logprobs (if asked) go with the request, not with one choice
            prompt = next((o.prompt_logprobs for o in group.ended if o.prompt_logprobs is not None), None)
            choices = tuple(sorted((dataclasses.replace(o, prompt_logprobs=None) for o in group.ended),
                                   key=lambda o: o.index))
            seq.on_output(SequenceOutput(request.request_id, "", True, None, len(seq.prompt_ids),
                                         sum(o.completion_tokens for o in choices), None, seq.token_times,
                                         seq.arrival_time, prompt_logprobs=prompt, choices=choices))

    @staticmethod
    def _text(seq: Sequence, piece: str) -> str:
        """What an output carries: the new piece (streams), else the whole text (with the prompt
        unless exclude_input_in_output)."""
        request = seq.request
        if request.stream:
            return piece
        return seq.text_stream.text if request.exclude_input_in_output else request.prompt + seq.text_stream.text

