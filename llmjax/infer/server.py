"""The OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn, the `serve` extra).

    engine = Engine(params, cfg, EngineConfig(max_queue=64), eos_token_id=tokenizer.eot_id)
    app = create_app(engine, tokenizer, model_name="my-model", max_model_len=cfg.max_seq_len)
    uvicorn.run(app, host="127.0.0.1", port=8000)      # or: python -m experiments serve --ckpt RUN

Endpoints: POST /v1/completions, POST /v1/chat/completions (both streamed by server-sent events with
"stream": true, ending with `data: [DONE]`), POST /v1/embeddings (with an `embedder`:
llmjax/infer/embeddings.py, concurrent requests batched together on its own thread), GET /v1/models,
GET /health, GET /metrics (Prometheus text). With an API key, every /v1 endpoint wants
`Authorization: Bearer KEY`. An encoder is served without an engine (`create_app(None, ..., embedder=...)`):
completions and chat then answer 404; a decoder can serve both.

Two threads. The engine is not thread-safe, so one background thread (`AsyncEngine`) owns it: it takes
requests and aborts from a thread-safe queue, loops `engine.step()` while anything is unfinished (sleeps
on the queue otherwise), and hands each request's outputs to its asyncio consumer with
`loop.call_soon_threadsafe`. The asyncio side (uvicorn's event loop) parses and checks requests, turns
token ids into text (`TextStream`: whole UTF-8 characters only, stop strings cut off) and writes
responses. A request whose client goes away, or whose stop string appears, is aborted in the engine,
which frees its KV blocks at once.

Every error is OpenAI's JSON body `{"error": {"message", "type", "param", "code"}}`: 400 for malformed
JSON, unknown fields, wrong types or values, prompts that do not fit the context; 401 for a missing or
wrong API key; 404 for an unknown model; 429 when the engine's waiting queue is full.

Chat prompts come from the model's Jinja chat template (`llmjax.tokenizer.chat.ChatFormat.from_folder`: a Hugging
Face folder's `chat_template.jinja` or `tokenizer_config.json` "chat_template"; `ChatFormat.from_gguf`: a GGUF file's
"tokenizer.chat_template"), rendered as transformers' `apply_chat_template` renders it. A model without one
uses `default_chat_prompt`, plain text for base models:

    System: {system message}\n\nUser: {user message}\n\nAssistant: {reply}\n\n ... Assistant:

FastAPI and uvicorn are imported only by `create_app` / `serve`, so `llmjax.infer` works without them.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import queue
import signal
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from llmjax.infer import embeddings as embedding_api
from llmjax.infer.embeddings import call_on as _call_on
from llmjax.infer.engine import EngineError, EngineStats, QueueFull, RequestOutput, SamplingParams
from llmjax.infer.openai_api import APIError, Fields, check_model, invalid, json_type, parse_json_body  # noqa: F401
from llmjax.tokenizer import TokenizerError
from llmjax.tokenizer.chat import ChatFormat, ChatTemplateError

logger = logging.getLogger("llmjax.server")

SERVE_EXTRA_HINT = "pip install 'llmjax[serve]' (or ./install.sh serve)"
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: the rest of the context)
MAX_STOP_STRINGS = 4  # as OpenAI
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0  # generated tokens/s is averaged over this many seconds
DISCONNECT_POLL_S = 0.25  # a non-streamed request checks this often whether its client is still there
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def require_serve_extra() -> None:
    """One clear error when FastAPI / uvicorn are missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ImportError(f"the HTTP server needs FastAPI and uvicorn ({error.name} is missing): "
                          f"{SERVE_EXTRA_HINT}") from None


@dataclass(frozen=True)
class GenerationRequest:
    """What a completions or chat request asks the engine for, checked."""

    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


SAMPLING_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
                   "stream_options", "ignore_eos", "user", "presence_penalty", "frequency_penalty", "logit_bias",
                   "logprobs")
COMPLETION_FIELDS = SAMPLING_FIELDS + ("prompt", "echo", "best_of", "suffix")
CHAT_FIELDS = SAMPLING_FIELDS + ("messages", "max_completion_tokens", "top_logprobs")


def read_prompt(fields: Fields, tokenizer) -> list[int]:
    """/v1/completions' prompt: one string, or one list of token ids."""
    prompt = fields.get("prompt")
    if prompt is None:
        raise invalid("prompt is required", "prompt", "missing_field")
    if isinstance(prompt, str):
        try:
            ids = tokenizer.encode_prompt(prompt)
        except TokenizerError as error:
            raise invalid(f"prompt cannot be tokenized: {error}", "prompt") from None
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise invalid("prompt holds several prompts; this server takes one prompt per request (a string or a list "
                      "of token ids)", "prompt", "unsupported")
    else:
        raise invalid(f"prompt must be a string or a list of token ids, not {json_type(prompt)}", "prompt",
                      "invalid_type")
    if not ids:
        raise invalid("prompt is empty; give at least one token", "prompt")
    return ids


def read_generation(fields: Fields, prompt_ids: list[int], *, max_model_len: int, prompt_param: str,
                    max_tokens_field: str, default_max_tokens: int | None) -> GenerationRequest:
    """The sampling options shared by both endpoints, checked against the context window. prompt_param names the
    field the prompt came from; max_tokens_field the endpoint's own name for max_tokens (which is accepted too)."""
    if fields.integer("n", 1) != 1:
        raise invalid(f"n={fields.get('n')}: this server returns one choice per request (n=1)", "n", "unsupported")
    fields.unsupported("presence_penalty", (0,), "a presence penalty")
    fields.unsupported("frequency_penalty", (0,), "a frequency penalty")
    fields.unsupported("logit_bias", ({},), "logit_bias")
    fields.unsupported("logprobs", (False, 0), "logprobs")
    fields.string("user")  # accepted, unused
    prompt_tokens = len(prompt_ids)
    if prompt_tokens >= max_model_len:
        raise invalid(f"the prompt has {prompt_tokens} tokens, which leaves no room to generate in the context "
                      f"window of {max_model_len} tokens; shorten it", prompt_param, "context_length_exceeded")
    room = max_model_len - prompt_tokens
    if max_tokens_field != "max_tokens" and fields.present("max_tokens") and fields.present(max_tokens_field):
        raise invalid(f"give max_tokens or {max_tokens_field}, not both", max_tokens_field)
    name = max_tokens_field if fields.present(max_tokens_field) else "max_tokens"
    max_tokens = fields.integer(name, default_max_tokens, minimum=1)
    if max_tokens is None:
        max_tokens = room
    if max_tokens > room:
        raise invalid(f"{name}={max_tokens} is too many: the prompt has {prompt_tokens} tokens and the context window "
                      f"is {max_model_len}, which leaves room for {room}", name, "context_length_exceeded")
    stop = fields.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise invalid("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP_STRINGS or any(s == "" for s in stop):
        raise invalid(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    stream = fields.boolean("stream", False)
    include_usage = False
    options = fields.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("stream_options is only allowed with stream: true", "stream_options")
        if not (isinstance(options, dict) and set(options) <= {"include_usage"}):
            raise invalid('stream_options must be an object like {"include_usage": true}', "stream_options",
                          "invalid_type")
        include_usage = Fields(options, ("include_usage",)).boolean("include_usage", False)
    params = SamplingParams(max_tokens=max_tokens, temperature=fields.number("temperature", 1.0, 0.0, 2.0),
                            top_p=fields.number("top_p", 1.0, 0.0, 1.0, low_open=True),
                            top_k=fields.integer("top_k", 0, minimum=0), seed=fields.integer("seed", None),
                            ignore_eos=fields.boolean("ignore_eos", False))
    return GenerationRequest(prompt_ids, params, tuple(stop), stream, include_usage)


def parse_completion_request(data: dict, tokenizer, *, model_name: str, max_model_len: int) -> GenerationRequest:
    """A checked /v1/completions request (raises APIError)."""
    fields = Fields(data, COMPLETION_FIELDS)
    check_model(fields, model_name)
    fields.unsupported("echo", (False,), "echo")
    fields.unsupported("best_of", (1,), "best_of other than 1")
    fields.unsupported("suffix", ("",), "suffix")
    prompt_ids = read_prompt(fields, tokenizer)
    return read_generation(fields, prompt_ids, max_model_len=max_model_len, prompt_param="prompt",
                           max_tokens_field="max_tokens", default_max_tokens=DEFAULT_COMPLETION_TOKENS)


def parse_chat_request(data: dict, tokenizer, chat_format: ChatFormat, *, model_name: str,
                       max_model_len: int) -> GenerationRequest:
    """A checked /v1/chat/completions request: its messages rendered by the chat template and tokenized."""
    fields = Fields(data, CHAT_FIELDS)
    check_model(fields, model_name)
    fields.unsupported("top_logprobs", (0,), "top_logprobs")
    messages = read_messages(fields.get("messages"))
    try:
        prompt_ids = tokenizer.encode_prompt(chat_format.render(messages))
    except ChatTemplateError as error:
        raise invalid(f"the chat template refused these messages: {error}", "messages") from None
    except TokenizerError as error:
        raise invalid(f"messages cannot be tokenized: {error}", "messages") from None
    return read_generation(fields, prompt_ids, max_model_len=max_model_len, prompt_param="messages",
                           max_tokens_field="max_completion_tokens", default_max_tokens=None)


def read_messages(messages) -> list[dict]:
    """Chat messages as [{"role", "content": str}] (content given as text parts is joined)."""
    if messages is None:
        raise invalid("messages is required", "messages", "missing_field")
    if not isinstance(messages, list):
        raise invalid(f"messages must be an array of {{role, content}} objects, not {json_type(messages)}", "messages",
                      "invalid_type")
    if not messages:
        raise invalid("messages is empty; give at least one message", "messages")
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object with role and content", where, "invalid_type")
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise invalid(f"{where} has unrecognized field {sorted(unknown)[0]!r} (takes role, content, name)", where,
                          "unknown_field")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role={json.dumps(role)}: must be one of {', '.join(CHAT_ROLES)}", f"{where}.role")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise invalid(f"{where}.content parts must be {{\"type\": \"text\", \"text\": ...}} (text only)",
                              f"{where}.content", "unsupported")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise invalid(f"{where}.content must be a string or a list of text parts, not {json_type(content)}",
                          f"{where}.content", "invalid_type")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise invalid(f"{where}.name must be a string", f"{where}.name", "invalid_type")
        checked.append({"role": role, "content": content} | ({"name": name} if name is not None else {}))
    return checked


# --- token ids -> text ------------------------------------------------------------------------------

class TextStream:
    """One request's generated ids -> text deltas: whole UTF-8 characters only, stop strings cut off.

    Each token is decoded after the token before it (the prompt's last token for the first) so that
    tokenizers whose pieces depend on what precedes them (SentencePiece's leading space) decode as in
    the whole text. Text that might be the start of a stop string is held back until it is not, so a stop
    string can only begin in the text not yet handed out: that is all this keeps.
    """

    def __init__(self, tokenizer, previous_id: int | None, stop: Sequence[str] = ()):
        self.tokenizer, self.previous_id, self.stop = tokenizer, previous_id, tuple(stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.unsent = ""    # decoded, not handed out yet (cut at the stop string once one appears)
        self.stopped = False

    def push(self, token_ids: Sequence[int]) -> str:
        """Text that can be released after these tokens."""
        for token_id in token_ids:
            if self.stopped:
                break
            self._append(self.decoder.decode(self._token_bytes(token_id)))
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The rest of the text (a character cut short at the end becomes U+FFFD)."""
        if not self.stopped:
            self._append(self.decoder.decode(b"", final=True))
        return self._release(final=True)

    def _token_bytes(self, token_id: int) -> bytes:
        decode = self.tokenizer.decode_bytes
        try:
            if self.previous_id is None:
                piece = decode([token_id])
            else:
                piece = decode([self.previous_id, token_id])[len(decode([self.previous_id])):]
        except TokenizerError:  # an id of the model's padded vocabulary that the tokenizer lacks
            piece = b""
        self.previous_id = token_id
        return piece

    def _append(self, text: str) -> None:
        if not text:
            return
        self.unsent += text
        hits = [index for stop in self.stop if (index := self.unsent.find(stop)) >= 0]
        if hits:
            self.unsent, self.stopped = self.unsent[: min(hits)], True

    def _release(self, final: bool) -> str:
        end = len(self.unsent) if final else len(self.unsent) - self._held_back()
        delta, self.unsent = self.unsent[:end], self.unsent[end:]
        return delta

    def _held_back(self) -> int:
        """Length of the longest end of the unsent text that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.unsent)), longest, -1):
                if self.unsent.endswith(stop[:size]):
                    longest = size
                    break
        return longest


# --- metrics ----------------------------------------------------------------------------------------

class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        self.counts[index] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip([*map(_number, self.buckets), "+Inf"], self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return out + [f"{name}_sum {_number(self.sum)}", f"{name}_count {cumulative}"]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass
class ServerMetrics:
    """Counters kept on the asyncio side (one thread: no lock needed)."""

    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    finished: collections.Counter = field(default_factory=collections.Counter)   # finish reason -> requests
    rejected: collections.Counter = field(default_factory=collections.Counter)   # HTTP status -> requests
    in_flight: int = 0


def prometheus_text(stats: EngineStats, metrics: ServerMetrics, tokens_per_second: float, step_failures: int) -> str:
    """The /metrics page: Prometheus text exposition format 0.0.4."""
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[str]):
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

    def gauge(name, help_text, value):
        metric(name, "gauge", help_text, [f"{name} {_number(value)}"])

    def counter(name, help_text, value):
        metric(name, "counter", help_text, [f"{name} {_number(value)}"])

    gauge("llmjax_requests_waiting", "Requests waiting in the engine's queue.", stats.num_waiting)
    gauge("llmjax_requests_running", "Requests being decoded.", stats.num_running)
    gauge("llmjax_requests_preempted", "Requests preempted (swapped out or to be recomputed).", stats.num_preempted)
    gauge("llmjax_requests_in_flight", "HTTP generation requests being answered.", metrics.in_flight)
    gauge("llmjax_kv_blocks_used", "KV-cache blocks in use.", stats.blocks_used)
    gauge("llmjax_kv_blocks_total", "KV-cache blocks in the pool.", stats.blocks_total)
    gauge("llmjax_kv_cache_usage_ratio", "Fraction of the KV-cache pool in use.",
          stats.blocks_used / max(stats.blocks_total, 1))
    gauge("llmjax_generation_tokens_per_second", f"Generated tokens per second over the last {RATE_WINDOW_S:g} s.",
          tokens_per_second)
    counter("llmjax_prompt_tokens_total", "Prompt tokens admitted by the engine.", stats.prompt_tokens_total)
    counter("llmjax_generation_tokens_total", "Tokens generated by the engine.", stats.generated_tokens_total)
    counter("llmjax_preemptions_total", "Preemptions since start.", stats.preemptions_total)
    counter("llmjax_engine_step_failures_total", "engine.step() calls that raised (their requests got a 500).",
            step_failures)
    metric("llmjax_time_to_first_token_seconds", "histogram", "Seconds from a request's arrival to its first token.",
           metrics.time_to_first_token.lines("llmjax_time_to_first_token_seconds"))
    metric("llmjax_requests_finished_total", "counter", "Generation requests answered, by finish reason.",
           [f'llmjax_requests_finished_total{{finish_reason="{reason}"}} {count}'
            for reason, count in sorted(metrics.finished.items())])
    metric("llmjax_requests_rejected_total", "counter", "Requests answered with an error, by HTTP status.",
           [f'llmjax_requests_rejected_total{{status="{status}"}} {count}'
            for status, count in sorted(metrics.rejected.items())])
    return "\n".join(lines) + "\n"


def embedding_prometheus_text(embedder, metrics: ServerMetrics | None) -> str:
    """The embedder's lines of /metrics (and the rejected-requests counter when no engine's lines carry it)."""
    lines = []
    for name, help_text, value in (
            ("llmjax_embedding_batches_total", "Forward passes of the embedding batcher.", embedder.batches_run),
            ("llmjax_embedding_sequences_total", "Inputs embedded.", embedder.sequences_run),
            ("llmjax_embedding_batch_failures_total", "Embedding batches that failed (their requests got a 500).",
             embedder.failures)):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {_number(value)}"]
    lines += ["# HELP llmjax_embedding_requests_waiting Embedding requests queued for the batcher.",
              "# TYPE llmjax_embedding_requests_waiting gauge",
              f"llmjax_embedding_requests_waiting {embedder.waiting()}"]
    if metrics is not None:
        lines += ["# HELP llmjax_requests_rejected_total Requests answered with an error, by HTTP status.",
                  "# TYPE llmjax_requests_rejected_total counter",
                  *(f'llmjax_requests_rejected_total{{status="{status}"}} {count}'
                    for status, count in sorted(metrics.rejected.items()))]
    return "\n".join(lines) + "\n"


# --- the engine thread ------------------------------------------------------------------------------

@dataclass
class _Route:
    """Where a request's outputs go: an asyncio queue on the server's event loop."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue

    def deliver(self, item) -> bool:
        return _call_on(self.loop, self.outputs.put_nowait, item)


class EngineFailure(RuntimeError):
    """engine.step() raised: the requests it was serving are ended with a 500."""


class AsyncEngine:
    """Drives a (not thread-safe) engine from one background thread; requests come and go through queues.

    add() / abort() are called on the event loop; the thread owns the engine and the routing table.
    """

    def __init__(self, engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}              # engine thread only
        self._stats = engine.stats()                      # a snapshot, replaced by the engine thread
        self._recent_tokens: collections.deque = collections.deque()  # (time, tokens generated by a step)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.steps_failed = 0

    # event-loop side ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmjax-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._commands.put(("stop",))
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue:
        """Submit a request; returns the queue its RequestOutputs (or an EngineFailure) arrive on.
        Raises EngineError (bad request) or QueueFull from engine.add_request."""
        loop = asyncio.get_running_loop()
        route, accepted = _Route(loop, asyncio.Queue()), loop.create_future()
        self._commands.put(("add", request_id, prompt_ids, params, route, accepted))
        try:
            await accepted
        except asyncio.CancelledError:  # nobody will read its outputs
            self.abort(request_id)
            raise
        return route.outputs

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = sum(tokens for at, tokens in self._recent_tokens if at >= now - RATE_WINDOW_S)
        return recent / RATE_WINDOW_S

    # engine-thread side ---------------------------------------------------------------------------

    def _run(self) -> None:
        running = True
        while running:
            running = self._take_commands(wait=not self.engine.has_unfinished())
            if running and self.engine.has_unfinished():
                self._step()
            self._stats = self.engine.stats()
        shutting_down = EngineFailure("the server is shutting down")
        self._end_all(shutting_down)
        while True:  # requests submitted after the stop: refused
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                _call_on(command[4].loop, _settle, command[5], shutting_down)
        self._stats = self.engine.stats()

    def _take_commands(self, wait: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False once asked to stop."""
        try:
            command = self._commands.get() if wait else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            if command[0] == "add":
                self._add(*command[1:])
            else:
                self._routes.pop(command[1], None)
                self.engine.abort(command[1])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, request_id, prompt_ids, params, route: _Route, accepted: asyncio.Future) -> None:
        try:
            self.engine.add_request(request_id, prompt_ids, params)
        except Exception as error:  # EngineError, QueueFull (or a bug: answered with a 500)
            _call_on(route.loop, _settle, accepted, error)
            return
        self._routes[request_id] = route
        _call_on(route.loop, _settle, accepted, None)

    def _step(self) -> None:
        try:
            outputs: list[RequestOutput] = self.engine.step()
        except Exception as error:  # a bug in the engine: end what it was serving, keep the server up
            self.steps_failed += 1
            logger.error("engine.step() failed:\n%s", traceback.format_exc())
            self._end_all(EngineFailure(f"the engine failed: {type(error).__name__}: {error}"))
            return
        generated = 0
        batches: dict[asyncio.AbstractEventLoop, list] = {}  # one wake-up of each event loop per step
        for output in outputs:
            generated += len(output.new_token_ids)
            route = self._routes.get(output.request_id)
            if route is None:
                continue  # aborted by its consumer
            if output.finished:
                del self._routes[output.request_id]
            batches.setdefault(route.loop, []).append((route.outputs, output))
        for loop, items in batches.items():
            if not _call_on(loop, _put_all, items):
                for _, output in items:
                    self._routes.pop(output.request_id, None)
                    self.engine.abort(output.request_id)
        now = time.monotonic()
        with self._lock:
            self._recent_tokens.append((now, generated))
            while self._recent_tokens and self._recent_tokens[0][0] < now - RATE_WINDOW_S:
                self._recent_tokens.popleft()

    def _end_all(self, failure: EngineFailure) -> None:
        for request_id, route in list(self._routes.items()):
            route.deliver(failure)
            with contextlib.suppress(Exception):
                self.engine.abort(request_id)
        self._routes.clear()
        with contextlib.suppress(Exception):
            while self.engine.has_unfinished():  # report the aborts, so the engine is empty
                self.engine.step()


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for outputs, item in items:
        outputs.put_nowait(item)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(None) if error is None else future.set_exception(error)


# --- one request on the asyncio side ----------------------------------------------------------------

class ClientDisconnected(Exception):
    """The client of a non-streamed request went away while it was being generated."""


class Generation:
    """One request's life on the event loop: submitted, its outputs turned into text, aborted if abandoned."""

    def __init__(self, driver: AsyncEngine, tokenizer, request: GenerationRequest, metrics: ServerMetrics,
                 arrival: float, prefix: str):
        self.driver, self.request, self.metrics, self.arrival = driver, request, metrics, arrival
        self.request_id = f"{prefix}-{uuid.uuid4().hex}"
        self.text = TextStream(tokenizer, request.prompt_ids[-1], request.stop)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.outputs: asyncio.Queue | None = None
        self.first_token_seen = False
        self.next_disconnect_check = 0.0

    @property
    def usage(self) -> dict:
        prompt = len(self.request.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    async def start(self) -> None:
        try:
            self.outputs = await self.driver.add(self.request_id, self.request.prompt_ids, self.request.params)
        except QueueFull as error:
            raise APIError(429, f"the server is busy ({error}); retry later", type="rate_limit_error",
                           code="queue_full") from None
        except EngineError as error:
            raise invalid(str(error)) from None
        except EngineFailure as error:
            raise APIError(503, str(error), type="server_error", code="engine_not_running") from None
        except Exception as error:
            raise APIError(500, f"the engine refused the request: {type(error).__name__}: {error}",
                           type="server_error") from None
        self.metrics.in_flight += 1

    async def deltas(self, disconnected: Callable | None = None) -> AsyncIterator[str]:
        """Text deltas until the request finishes (self.finish_reason is then set). `disconnected`: an async
        predicate polled while waiting, to abort when the client has gone (non-streamed requests)."""
        try:
            while self.finish_reason is None:
                output = await self._next_output(disconnected)
                if isinstance(output, EngineFailure):
                    raise APIError(500, str(output), type="server_error", code="engine_failure")
                if output.new_token_ids and not self.first_token_seen:
                    self.first_token_seen = True
                    self.metrics.time_to_first_token.observe(time.monotonic() - self.arrival)
                self.completion_tokens = output.num_generated
                ids = output.new_token_ids
                if output.finished and output.finish_reason == "stop" and ids:
                    ids = ids[:-1]  # the end-of-text / stop token is not part of the text
                delta = self.text.push(ids)
                if self.text.stopped:
                    self._finish("stop")
                elif output.finished:
                    if output.finish_reason not in ("stop", "length"):
                        raise APIError(500, f"the engine ended the request ({output.finish_reason})",
                                       type="server_error", code="aborted")
                    delta += self.text.finish()
                    self._finish(output.finish_reason)
                if delta:
                    yield delta
        finally:
            self.close()

    async def _next_output(self, disconnected: Callable | None):
        if disconnected is None:
            return await self.outputs.get()
        while True:
            if time.monotonic() >= self.next_disconnect_check:
                self.next_disconnect_check = time.monotonic() + DISCONNECT_POLL_S
                if await disconnected():
                    raise ClientDisconnected
            try:
                return await asyncio.wait_for(self.outputs.get(), timeout=DISCONNECT_POLL_S)
            except TimeoutError:
                pass

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.metrics.finished[reason] += 1

    def close(self) -> None:
        """Abort in the engine if still running (a stop string, a client gone, an error); idempotent."""
        if self.outputs is None:
            return
        if self.finish_reason is None or self.text.stopped:
            self.driver.abort(self.request_id)
        if self.finish_reason is None:
            self.metrics.finished["abort"] += 1
        self.outputs = None
        self.metrics.in_flight -= 1


# --- response bodies --------------------------------------------------------------------------------

def completion_body(generation: Generation, text: str, model: str, created: int) -> dict:
    return {"id": generation.request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": generation.finish_reason}],
            "usage": generation.usage}


def chat_body(generation: Generation, text: str, model: str, created: int) -> dict:
    return {"id": generation.request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": generation.finish_reason}],
            "usage": generation.usage}


def sse(data) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def completion_events(generation: Generation, model: str, created: int, chat: bool) -> AsyncIterator[str]:
    """The streamed response: OpenAI's chunks, an optional usage chunk, then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: dict, finish_reason=None) -> dict:
        choice = {"index": 0, **piece, "logprobs": None, "finish_reason": finish_reason}
        return {"id": generation.request_id, "object": kind, "created": created, "model": model, "choices": [choice]}

    def content(text: str) -> dict:
        return {"delta": {"content": text}} if chat else {"text": text}

    try:
        if chat:
            yield sse(chunk({"delta": {"role": "assistant", "content": ""}}))
        async for text in generation.deltas():
            yield sse(chunk(content(text)))
        yield sse(chunk({"delta": {}} if chat else {"text": ""}, generation.finish_reason))
        if generation.request.include_usage:
            yield sse({"id": generation.request_id, "object": kind, "created": created, "model": model, "choices": [],
                       "usage": generation.usage})
    except APIError as error:
        generation.metrics.rejected[error.status] += 1
        yield sse(error.body())
    yield sse("[DONE]")


# --- the app ----------------------------------------------------------------------------------------

def create_app(engine, tokenizer, *, model_name: str, max_model_len: int, chat_format: ChatFormat | None = None,
               api_key: str | None = None, stop_token_ids: Sequence[int] = (), embedder=None):
    """The FastAPI app serving `engine` (an llmjax.infer.engine.Engine; the app's lifespan starts and stops
    the thread that drives it). max_model_len: the model's context window (cfg.max_seq_len). stop_token_ids:
    the model's end-of-text ids besides the engine's EOS id (Llama 3's <|eot_id|>); they end every request
    that does not ask for ignore_eos. embedder: an llmjax.infer.embeddings.Embedder answering /v1/embeddings
    (its worker thread also started and stopped by the lifespan); engine None: embeddings only."""
    require_serve_extra()
    if engine is None and embedder is None:
        raise ValueError("create_app: give an engine (completions, chat), an embedder (embeddings) or both")
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    chat_format = chat_format or ChatFormat()
    driver = AsyncEngine(engine) if engine is not None else None
    metrics = ServerMetrics()
    started = int(time.time())

    class EventStream(StreamingResponse):
        """Server-sent events that always end their request: the generator is closed and the engine request
        aborted however the response ends (finished, client gone mid-stream, or before the first event)."""

        def __init__(self, events, generation: Generation):
            super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.generation = generation

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.body_iterator.aclose()
                self.generation.close()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for part in (driver, embedder):
            if part is not None:
                part.start()
        try:
            yield
        finally:
            for part in (driver, embedder):
                if part is not None:
                    part.stop()

    app = FastAPI(title="llmjax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.driver, app.state.metrics, app.state.embedder = driver, metrics, embedder

    def error_response(error: APIError):
        metrics.rejected[error.status] += 1
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def on_api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(APIError(error.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def on_unexpected(request, error: Exception):
        logger.error("unexpected error on %s:\n%s", request.url.path, traceback.format_exc())
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error"))

    def check_api_key(request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_body(request) -> dict:
        check_api_key(request)
        if driver is None:
            raise APIError(404, f"{model_name!r} is an embedding model: this server answers POST /v1/embeddings, not "
                           f"{request.url.path} (it has no generation engine)", param="model",
                           code="unsupported_endpoint")
        if not driver.alive:
            raise APIError(503, "the engine is not running", type="server_error", code="engine_not_running")
        return parse_json_body(await request.body())

    async def answer(request, parsed: GenerationRequest, arrival: float, chat: bool):
        if stop_token_ids and not parsed.params.ignore_eos:
            params = dataclasses.replace(parsed.params, stop_token_ids=tuple(stop_token_ids))
            parsed = dataclasses.replace(parsed, params=params)
        generation = Generation(driver, tokenizer, parsed, metrics, arrival, "chatcmpl" if chat else "cmpl")
        await generation.start()
        created = int(time.time())
        if parsed.stream:
            return EventStream(completion_events(generation, model_name, created, chat), generation)
        try:
            text = "".join([delta async for delta in generation.deltas(request.is_disconnected)])
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        body = chat_body if chat else completion_body
        return JSONResponse(body(generation, text, model_name, created))

    # Plain routes (the endpoint gets the request, returns a response): the body is read and checked here,
    # so that every bad input gets OpenAI's error body rather than FastAPI's validation format.
    async def completions(request):
        arrival = time.monotonic()
        data = await read_body(request)
        parsed = parse_completion_request(data, tokenizer, model_name=model_name, max_model_len=max_model_len)
        return await answer(request, parsed, arrival, chat=False)

    async def chat_completions(request):
        arrival = time.monotonic()
        data = await read_body(request)
        parsed = parse_chat_request(data, tokenizer, chat_format, model_name=model_name, max_model_len=max_model_len)
        return await answer(request, parsed, arrival, chat=True)

    async def embeddings(request):
        check_api_key(request)
        if embedder is None:
            raise APIError(404, f"this server does not serve embeddings of {model_name!r} (started without them)",
                           param="model", code="unsupported_endpoint")
        if not embedder.alive:
            raise APIError(503, "the embedding worker is not running", type="server_error", code="embedder_not_running")
        parsed = embedding_api.parse_embedding_request(parse_json_body(await request.body()), embedder,
                                                       model_name=model_name)
        if embedding_api.request_chars(parsed) > embedding_api.TOKENIZE_IN_THREAD_CHARS:  # keep the loop free
            sequences = await asyncio.to_thread(embedding_api.tokenize_inputs, parsed, embedder)
        else:
            sequences = embedding_api.tokenize_inputs(parsed, embedder)
        try:
            vectors = await embedder.embed(sequences)
        except embedding_api.EmbedFailure as error:
            raise APIError(500, str(error), type="server_error", code="embedding_failure") from None
        vectors = embedding_api.shorten(vectors, parsed.dimensions, embedder.config.normalize)
        return JSONResponse(embedding_api.embeddings_body(vectors, sequences, parsed, model_name))

    endpoints = [name for name, part in (("completions", driver), ("chat.completions", driver),
                                         ("embeddings", embedder)) if part is not None]

    async def models(request):
        check_api_key(request)
        card = {"id": model_name, "object": "model", "created": started, "owned_by": "llmjax",
                "max_model_len": max_model_len, "endpoints": endpoints}
        if embedder is not None:
            card |= {"embedding_dimension": embedder.dimension, "max_embedding_tokens": embedder.max_tokens}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request):
        if driver is not None and not driver.alive:
            return error_response(APIError(503, "the engine thread is not running", type="server_error",
                                           code="engine_not_running"))
        if embedder is not None and not embedder.alive:
            return error_response(APIError(503, "the embedding worker is not running", type="server_error",
                                           code="embedder_not_running"))
        return JSONResponse({"status": "ok", "pid": os.getpid()})  # pid: which worker process answered

    async def prometheus(request):
        text = "" if driver is None else prometheus_text(driver.stats(), metrics, driver.tokens_per_second(),
                                                         driver.steps_failed)
        if embedder is not None:
            text += embedding_prometheus_text(embedder, metrics if driver is None else None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    for path, endpoint, method in (("/v1/completions", completions, "POST"),
                                   ("/v1/chat/completions", chat_completions, "POST"),
                                   ("/v1/embeddings", embeddings, "POST"), ("/v1/models", models, "GET"),
                                   ("/health", health, "GET"), ("/metrics", prometheus, "GET")):
        app.add_route(path, endpoint, methods=[method])
    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    require_serve_extra()
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _serve_worker(make_app: Callable, argument, sock, log_level: str) -> None:
    """One worker process of `serve_processes`: its own app (model, engine, batcher) on the shared socket. It exits
    when its parent is gone (killed with SIGKILL, say), not serving on as an orphan."""
    import uvicorn

    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    app = make_app(argument)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])


class ServerProcesses:
    """`workers` server processes accepting on one listening socket, as `uvicorn --workers` and gunicorn do.

    Each process is spawned (no fork of a JAX process) and builds its own app with `make_app(argument)` (a
    module-level function, so it pickles): its own model copy, engine and embedding batcher, on the same devices.
    One process tops out at a few thousand small requests a second (HTTP parsing, validation and the asyncio
    hand-off hold the GIL); N processes answer N times as many while the accelerator has room. The kernel hands
    each new connection to one of the accepting processes; port 0 picks a free one (`.port`)."""

    def __init__(self, make_app: Callable, argument, *, workers: int, host: str = "127.0.0.1", port: int = 8000,
                 log_level: str = "info"):
        import multiprocessing
        import socket

        require_serve_extra()
        if workers < 1:
            raise ValueError(f"workers={workers}: must be >= 1")
        self.sock = socket.create_server((host, port), backlog=2048)  # SO_REUSEADDR; one listening socket for all
        self.port = self.sock.getsockname()[1]
        context = multiprocessing.get_context("spawn")
        self.processes = [context.Process(target=_serve_worker, args=(make_app, argument, self.sock, log_level))
                          for _ in range(workers)]
        self.stopping = False

    def start(self) -> ServerProcesses:
        for process in self.processes:
            process.start()
        return self

    def stop(self, *_) -> None:
        self.stopping = True
        for process in self.processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn shuts down gracefully

    def wait(self) -> int:
        """Until every worker has stopped (a worker that dies stops the others): 0, or 1 if one failed."""
        while any(process.is_alive() for process in self.processes):
            for process in self.processes:
                process.join(0.5)
                if process.exitcode not in (None, 0) and not self.stopping:
                    self.stop()
        self.sock.close()
        stopped = (0, -signal.SIGTERM)  # a clean exit, or killed by our stop() before uvicorn took over
        return 1 if any(process.exitcode not in stopped for process in self.processes) else 0

    def __enter__(self) -> ServerProcesses:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.wait()


def serve_processes(make_app: Callable, argument, *, workers: int, host: str = "127.0.0.1", port: int = 8000,
                    log_level: str = "info") -> int:
    """`ServerProcesses` until Ctrl-C / SIGTERM, which stop every worker: 0, or 1 if a worker failed."""
    servers = ServerProcesses(make_app, argument, workers=workers, host=host, port=port, log_level=log_level).start()
    previous = {sig: signal.signal(sig, servers.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return servers.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
