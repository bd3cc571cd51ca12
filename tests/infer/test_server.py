"""The OpenAI-compatible server: a real uvicorn server on a free localhost port over the real engine (a random
llama-tiny), driven by the real `openai` client (httpx for raw bodies): output equal to plain `generate`,
streaming, chat, metrics, every bad input's status and error body, 429, disconnects, and a load test."""

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax
import openai
import pytest
import uvicorn

from llmjax.config import get_config
from llmjax.infer.engine import Engine, EngineConfig
from llmjax.infer.generate import generate
from llmjax.infer.sampling import SamplingConfig
from llmjax.infer.server import TextStream, create_app
from llmjax.tokenizer.chat import ChatFormat, default_chat_prompt
from llmjax.model import init_params
from llmjax.tokenizer import load_tokenizer

MODEL = "tiny-test"
API_KEY = "sk-test"
# Small, fixed buckets: three programs to compile, shared by every engine below (they are module-level jits).
ENGINE = dict(num_blocks=96, block_size=4, max_running=8, max_tokens_per_step=64, batch_buckets=(8,),
              prefill_row_buckets=(4,), chunk_buckets=(32,))


class ControlledEngine(Engine):
    """The real engine with knobs for tests: `paused` (step() does nothing, so requests stay queued),
    `step_delay` (seconds slept per step, so a stream is still running when its client leaves) and
    `failures` (the next steps raise, as a bug in the engine would)."""

    paused = False
    step_delay = 0.0
    failures = 0

    def step(self):
        if self.paused:
            time.sleep(0.001)
            return []
        if self.failures:
            self.failures -= 1
            raise RuntimeError("injected failure")
        time.sleep(self.step_delay)
        return super().step()


@contextlib.contextmanager
def running_server(app):
    """uvicorn in a background thread on a free port; yields the base URL, shuts down cleanly."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def model(bpe):
    cfg = get_config("llama-tiny", vocab_size=bpe.vocab_size)
    return init_params(cfg, jax.random.key(3)), cfg, bpe


@pytest.fixture(scope="module")
def served(model):
    """(base URL, engine) of a server with an API key."""
    params, cfg, tokenizer = model
    engine = ControlledEngine(params, cfg, EngineConfig(**ENGINE, max_queue=64), eos_token_id=tokenizer.eot_id)
    app = create_app(engine, tokenizer, model_name=MODEL, max_model_len=cfg.max_seq_len, api_key=API_KEY)
    with running_server(app) as url:
        yield url, engine


@pytest.fixture
def client(served):
    with openai.OpenAI(base_url=served[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
        yield client


def post(url, path, body=None, *, raw=None, key=API_KEY, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(url + path, content=raw, headers=headers | {"Content-Type": "application/json"},
                          timeout=timeout)
    return httpx.post(url + path, json=body, headers=headers, timeout=timeout)


def wait_until_idle(engine, timeout=10.0):
    """The engine thread has applied every abort: nothing waiting or running, no block in use."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_waiting == stats.num_running == stats.blocks_used == 0:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"the engine did not drain: {engine.stats()}")


REFERENCE_TOKENS = 24  # every reference is one generate program (greedy output's first k tokens are its k-token output)


def reference_text(model, prompt_ids, max_tokens, sampling=None):
    """What plain `generate` produces in max_tokens (the end-of-text id is not text), its token count and finish
    reason."""
    params, cfg, tokenizer = model
    out = generate(params, cfg, [prompt_ids], max_new_tokens=REFERENCE_TOKENS, eos_id=tokenizer.eot_id,
                   sampling=sampling)
    tokens = out.tokens[0][:max_tokens]
    ended = tokens[-1] == tokenizer.eot_id
    return tokenizer.decode(tokens[:-1] if ended else tokens), len(tokens), "stop" if ended else "length"


# --- completions and chat ---------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,max_tokens", [("def f(x):\n    return", 13), ("é€ unicode 😀", 24), ("a", 1)])
def test_greedy_completion_equals_generate_streamed_or_not(model, client, prompt, max_tokens):
    tokenizer = model[2]
    text, count, reason = reference_text(model, tokenizer.encode(prompt), max_tokens)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
    choice = out.choices[0]
    assert (choice.text, choice.finish_reason) == (text, reason)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(tokenizer.encode(prompt)), count)
    assert out.model == MODEL and out.object == "text_completion"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == text  # no character broken between chunks (each half would be U+FFFD)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == count and not chunks[-1].choices


def test_prompt_as_token_ids_and_seeded_sampling(model, client):
    ids = model[2].encode("for i in range(")
    sampling = SamplingConfig(temperature=0.9, top_k=20, seed=11)
    text, _, _ = reference_text(model, ids, 12, sampling)
    outs = [client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0.9, seed=11,
                                      extra_body={"top_k": 20}).choices[0].text for _ in range(2)]
    assert outs == [text, text]  # the same seed gives generate's text, whatever else is in the batch


def test_chat_renders_the_template_then_completes(model, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    prompt_ids = model[2].encode(default_chat_prompt(messages))
    text, count, reason = reference_text(model, prompt_ids, 9)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=0)
    assert out.choices[0].message.content == text and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == reason and out.usage.prompt_tokens == len(prompt_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=9,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_chat_without_max_tokens_fills_the_context(model, client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == model[1].max_seq_len


def test_stop_string_cuts_the_text(model, client):
    full, _, _ = reference_text(model, model[2].encode("x = "), 24)
    stop = full[7:10]
    assert len(full) > 12 and stop
    for stream in (False, True):
        kwargs = dict(model=MODEL, prompt="x = ", max_tokens=24, temperature=0, stop=[stop, "\x00never"])
        if stream:
            chunks = list(client.completions.create(**kwargs, stream=True))
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            choice = client.completions.create(**kwargs).choices[0]
            text, reason = choice.text, choice.finish_reason
        assert (text, reason) == (full[: full.index(stop)], "stop")


def test_models_health_and_metrics(served, client):
    url, engine = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(url + "/health").json() == {"status": "ok", "pid": os.getpid()}  # the answering process
    client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0)
    metrics = parse_prometheus(httpx.get(url + "/metrics").text)
    stats = engine.stats()
    assert metrics["llmjax_kv_blocks_total"] == ENGINE["num_blocks"]
    assert metrics["llmjax_generation_tokens_total"] == stats.generated_tokens_total >= 3
    assert metrics["llmjax_requests_waiting"] == 0 and metrics["llmjax_requests_running"] == 0
    assert metrics["llmjax_kv_blocks_used"] == 0 and metrics["llmjax_generation_tokens_per_second"] > 0
    count = metrics["llmjax_time_to_first_token_seconds_count"]
    assert count >= 1 and metrics['llmjax_time_to_first_token_seconds_bucket{le="+Inf"}'] == count
    assert metrics['llmjax_requests_finished_total{finish_reason="length"}'] >= 1


def parse_prometheus(text: str) -> dict[str, float]:
    """{sample name with labels: value}; every line must be a comment or a well-formed sample, every metric
    announced by HELP and TYPE."""
    samples, typed = {}, set()
    for line in text.strip().splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-z_]+="[^"]*"\})? (-?[0-9.e+-]+|\+Inf|NaN)', line)
        assert match, f"not a Prometheus sample: {line!r}"
        assert re.sub(r"_(bucket|sum|count)$", "", match.group(1)) in typed, line
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


# --- bad input --------------------------------------------------------------------------------------

def completion(**fields):
    return {"model": MODEL, "prompt": "hello", "max_tokens": 4} | fields


BAD_REQUESTS = [
    # (path, body or raw bytes, status, code, param)
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x",', 400, "invalid_json", None),
    ("/v1/completions", b"[1, 2]", 400, "invalid_json", None),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "temperature": NaN}', 400, "invalid_json", None),
    ("/v1/completions", b"\xff\xfe", 400, "invalid_json", None),
    ("/v1/completions", completion(colour="blue"), 400, "unknown_field", "colour"),
    ("/v1/completions", completion(max_tokens="4"), 400, "invalid_type", "max_tokens"),
    ("/v1/completions", completion(max_tokens=2.5), 400, "invalid_type", "max_tokens"),
    ("/v1/completions", completion(temperature="hot"), 400, "invalid_type", "temperature"),
    ("/v1/completions", completion(stream="yes"), 400, "invalid_type", "stream"),
    ("/v1/completions", completion(prompt=5), 400, "invalid_type", "prompt"),
    ("/v1/completions", completion(prompt=[1, "a"]), 400, "invalid_type", "prompt"),
    ("/v1/completions", completion(prompt=["a", "b"]), 400, "unsupported", "prompt"),
    ("/v1/completions", completion(prompt=""), 400, "invalid_value", "prompt"),
    ("/v1/completions", completion(max_tokens=0), 400, "invalid_value", "max_tokens"),
    ("/v1/completions", completion(max_tokens=64), 400, "context_length_exceeded", "max_tokens"),
    ("/v1/completions", completion(prompt="z" * 200), 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", completion(prompt=[10**6]), 400, "invalid_value", None),
    ("/v1/completions", completion(temperature=2.5), 400, "invalid_value", "temperature"),
    ("/v1/completions", completion(top_p=0), 400, "invalid_value", "top_p"),
    ("/v1/completions", completion(top_k=-1), 400, "invalid_value", "top_k"),
    ("/v1/completions", completion(seed=-1), 400, "invalid_value", None),
    ("/v1/completions", completion(n=2), 400, "unsupported", "n"),
    ("/v1/completions", completion(echo=True), 400, "unsupported", "echo"),
    ("/v1/completions", completion(logprobs=3), 400, "unsupported", "logprobs"),
    ("/v1/completions", completion(presence_penalty=0.5), 400, "unsupported", "presence_penalty"),
    ("/v1/completions", completion(stop=["a", ""]), 400, "invalid_value", "stop"),
    ("/v1/completions", completion(stop=3), 400, "invalid_type", "stop"),
    ("/v1/completions", completion(stream_options={"include_usage": True}), 400, "invalid_value", "stream_options"),
    ("/v1/completions", completion(model="gpt-4"), 404, "model_not_found", "model"),
    ("/v1/completions", {"prompt": "x"}, 400, "missing_field", "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "invalid_type", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_value", "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 1}]}, 400, "invalid_type",
     "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x", "mood": 1}]}, 400,
     "unknown_field", "messages[0]"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                              "max_completion_tokens": 2}, 400, "invalid_value", "max_completion_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "prompt": "x"}, 400,
     "unknown_field", "prompt"),
    ("/v1/nothing", completion(), 404, "not_found", None),
]


@pytest.mark.parametrize("path,body,status,code,param", BAD_REQUESTS)
def test_bad_input_gets_its_status_and_an_openai_error_body(served, path, body, status, code, param):
    url, engine = served
    response = post(url, path, raw=body) if isinstance(body, bytes) else post(url, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert engine.stats().num_waiting == 0


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_api_key_is_required(served, key):
    response = post(served[0], "/v1/completions", completion(), key=key)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served[0] + "/v1/models").status_code == 401
    with openai.OpenAI(base_url=served[0] + "/v1", api_key=key or "-", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_openai_client_raises_the_matching_errors(client):
    with pytest.raises(openai.BadRequestError, match="n=3"):
        client.completions.create(model=MODEL, prompt="x", n=3)
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=500)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="x")


# --- queue bound, disconnects, cancellations --------------------------------------------------------

def test_full_queue_gives_429_then_requests_proceed(model):
    params, cfg, tokenizer = model
    engine = ControlledEngine(params, cfg, EngineConfig(**ENGINE, max_queue=2), eos_token_id=tokenizer.eot_id)
    app = create_app(engine, tokenizer, model_name=MODEL, max_model_len=cfg.max_seq_len)
    with running_server(app) as url:
        engine.paused = True  # nothing is scheduled: requests stay in the waiting queue
        body = {"model": MODEL, "prompt": "abc", "max_tokens": 3, "temperature": 0}
        with httpx.Client(base_url=url, timeout=30) as http:
            pending = [threading.Thread(target=lambda: results.append(http.post("/v1/completions", json=body)))
                       for _ in range(2)]
            results = []
            for thread in pending:
                thread.start()
            deadline = time.monotonic() + 10
            while engine.stats().num_waiting < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            metrics = parse_prometheus(http.get("/metrics").text)
            assert (metrics["llmjax_requests_waiting"], metrics["llmjax_requests_in_flight"]) == (2, 2)
            refused = http.post("/v1/completions", json=body)
            assert refused.status_code == 429
            error = refused.json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
            with openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(**body)
            engine.paused = False
            for thread in pending:
                thread.join(30)
            assert [r.status_code for r in results] == [200, 200]
            assert http.post("/v1/completions", json=body).status_code == 200
            metrics = parse_prometheus(http.get("/metrics").text)
            assert metrics['llmjax_requests_rejected_total{status="429"}'] == 2
        wait_until_idle(engine)


def test_client_that_disconnects_mid_stream_frees_its_blocks(served):
    url, engine = served
    before = engine.stats().generated_tokens_total
    engine.step_delay = 0.02  # 50 tokens would take a second
    try:
        body = {"model": MODEL, "prompt": "stream me", "max_tokens": 50, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))  # streaming has begun
                assert engine.stats().num_running == 1 and engine.stats().blocks_used > 0
            # leaving the block closes the connection mid-stream
        stats = wait_until_idle(engine)
    finally:
        engine.step_delay = 0.0
    assert stats.generated_tokens_total - before < 50  # aborted, not run to the end
    metrics = parse_prometheus(httpx.get(url + "/metrics").text)
    assert metrics['llmjax_requests_finished_total{finish_reason="abort"}'] >= 1


def test_cancelled_non_streamed_request_frees_its_blocks(served):
    url, engine = served
    before = engine.stats().generated_tokens_total
    engine.step_delay = 0.02
    try:
        body = {"model": MODEL, "prompt": "wait for me", "max_tokens": 50, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up: its connection closes
            post(url, "/v1/completions", body, timeout=0.3)
        stats = wait_until_idle(engine)
    finally:
        engine.step_delay = 0.0
    assert stats.generated_tokens_total - before < 50


def test_engine_failure_ends_its_requests_with_500_and_the_server_goes_on(served, client):
    url, engine = served
    engine.failures = 1
    response = post(url, "/v1/completions", {"model": MODEL, "prompt": "boom", "max_tokens": 4})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert "injected failure" in response.json()["error"]["message"]
    engine.failures = 1
    with pytest.raises(openai.APIError, match="injected failure"):  # mid-stream: an error event, then [DONE]
        list(client.completions.create(model=MODEL, prompt="boom", max_tokens=4, stream=True))
    wait_until_idle(engine)
    assert client.completions.create(model=MODEL, prompt="fine", max_tokens=2,
                                    extra_body={"ignore_eos": True}).usage.completion_tokens == 2
    assert parse_prometheus(httpx.get(url + "/metrics").text)["llmjax_engine_step_failures_total"] == 2


# --- load ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_load_of_many_concurrent_requests_leaks_no_block(served, client):
    url, engine = served
    total, concurrency = 2000, 24

    async def one(http, index, gate):
        body = {"model": MODEL, "prompt": f"request {index}: " + "ab" * (index % 7), "max_tokens": 1 + index % 6,
                "temperature": (index % 3) * 0.5, "seed": index}
        if index % 5 == 0:
            body["stop"] = ["a"]
        async with gate:
            if index % 2:
                response = await http.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["finish_reason"]
            async with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
                assert response.status_code == 200
                events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            return json.loads(events[-2][6:])["choices"][0]["finish_reason"]

    async def run():
        gate = asyncio.Semaphore(concurrency)
        # Idle connections dropped after 1 s, before uvicorn's 5 s keep-alive timeout closes them from its side: at
        # equal timeouts a request can be sent on a connection the server is closing (httpx.ReadError under load).
        limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=1.0)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                                     limits=limits) as http:
            return await asyncio.gather(*(one(http, i, gate) for i in range(total)))

    reasons = asyncio.run(run())
    assert len(reasons) == total and set(reasons) <= {"stop", "length"}
    wait_until_idle(engine)
    assert client.completions.create(model=MODEL, prompt="still here?", max_tokens=2).choices[0].finish_reason
    assert httpx.get(url + "/health").status_code == 200


# --- pieces -------------------------------------------------------------------------------------------

def test_text_stream_never_breaks_a_character_and_cuts_stop_strings():
    tokenizer = load_tokenizer("bytes")
    text = "naïve € 😀 end"
    stream = TextStream(tokenizer, None)
    deltas = [stream.push([byte]) for byte in text.encode()] + [stream.finish()]
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)
    assert deltas[text.encode().index("😀".encode()) + 3] == "😀"  # released whole, with its last byte

    stream = TextStream(tokenizer, None, stop=["€ 😀", "zzz"])
    deltas = [stream.push([byte]) for byte in text.encode()]
    assert "".join(deltas) == "naïve " and stream.stopped and stream.finish() == ""

    stream = TextStream(tokenizer, None, stop=["e\u20ac"])  # "e€" never appears: held-back "e" comes out at the end
    assert stream.push(list(b"one")) == "on" and stream.finish() == "e"


def test_text_stream_on_random_bytes_and_stop_strings():
    """Whatever the bytes (broken UTF-8 included) and however they are grouped into steps, the deltas add up to
    the one-shot decoding, cut just before the first stop string in it."""
    tokenizer = load_tokenizer("bytes")
    rng = random.Random(0)
    alphabet = "ab€é😀".encode() + b"\xff\x80"
    for _ in range(300):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        full = data.decode("utf-8", errors="replace")
        stops = [full[i: i + rng.randint(1, 3)] for i in sorted(rng.sample(range(40), 2)) if i < len(full)]
        stream = TextStream(tokenizer, None, stops)
        deltas, position = [], 0
        while position < len(data):
            step = rng.randint(1, 4)
            deltas.append(stream.push(list(data[position: position + step])))
            position += step
        out = "".join(deltas) + stream.finish()
        assert full.startswith(out)
        if stops:  # they are pieces of the text: the stream stops at the first one it sees whole
            assert stream.stopped and any(full.startswith(stop, len(out)) for stop in stops)
            assert not any(stop in out for stop in stops)
        else:
            assert out == full


def test_text_stream_decodes_each_token_after_the_one_before(model):
    """Byte-level BPE tokens concatenate; the prompt's last token is the context of the first."""
    tokenizer = model[2]
    ids = tokenizer.encode("def main():\n    return 'ünïcode'")
    stream = TextStream(tokenizer, ids[0])
    assert "".join(stream.push([t]) for t in ids[1:]) + stream.finish() == tokenizer.decode(ids[1:])


def test_text_stream_keeps_sentencepiece_spaces_after_the_prompt():
    """SentencePiece drops the leading space of a text's first word ("▁world" alone is "world"); a reply
    continues its prompt, so its first word keeps the space."""
    import io
    import sysconfig

    import sentencepiece

    from llmjax.tokenizer.sentencepiece import SentencePieceTokenizer

    model = io.BytesIO()
    lines = [line for name in ("textwrap.py", "string.py", "shlex.py")
             for line in Path(sysconfig.get_paths()["stdlib"], name).read_text().splitlines()]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(line for line in lines if line.strip()),
                                             model_writer=model, vocab_size=400, byte_fallback=True, minloglevel=2)
    tokenizer = SentencePieceTokenizer(model.getvalue())
    ids = tokenizer.encode("the text wraps é lines")
    cut = next(k for k in range(len(ids)) if tokenizer.decode(ids[:k]) == "the text")  # the prompt
    assert tokenizer.decode(ids[cut:]) == "wraps é lines"  # decoded alone: no leading space
    stream = TextStream(tokenizer, ids[cut - 1])
    assert "".join(stream.push([t]) for t in ids[cut:]) + stream.finish() == " wraps é lines"


def test_chat_template_from_a_tokenizer_config(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    chat = ChatFormat.from_folder(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    assert chat.render(messages) == "<s><|user|>hi</s><|assistant|>"
    assert ChatFormat.from_folder(tmp_path / "absent").render(messages) == "User: hi\n\nAssistant:"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert ChatFormat.from_folder(tmp_path).render(messages) == "[hi]"
    with pytest.raises(ValueError, match="does not compile"):
        ChatFormat.create("{% for %}")


# --- python -m experiments serve ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def run_without_fastapi(args, tmp_path):
    """python ARGS at the repository root, as if the serve extra were not installed."""
    (tmp_path / "fastapi.py").write_text("raise ImportError(\"No module named 'fastapi'\", name='fastapi')\n")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_serve_help_explains_every_flag():
    from llmjax.experiments.serve import build_parser

    parser = build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {"--ckpt", "--hf", "--model", "--host", "--port", "--api-key", "--max-queue", "--num-blocks",
            "--block-size", "--max-running", "--max-tokens-per-step", "--served-model-name"} <= flags
    assert all(action.help for action in parser._actions)
    assert parser.parse_args(["--model", "llama-tiny"]).host == "127.0.0.1"


def test_without_the_serve_extra_serving_is_one_clear_error(tmp_path):
    result = run_without_fastapi(["-c", "import llmjax.infer, llmjax.infer.server"], tmp_path)
    assert result.returncode == 0, result.stderr  # the package imports without FastAPI
    result = run_without_fastapi(["-m", "experiments", "serve", "--model", "llama-tiny"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("python -m experiments serve: the HTTP server needs FastAPI and uvicorn (fastapi "
                                     "is missing): pip install 'llmjax[serve]' (or ./install.sh serve)")


@pytest.mark.parametrize("flags,message", [
    (["--max-running", "64", "--max-tokens-per-step", "32"], "max_tokens_per_step=32 is below max_running=64"),
    (["--num-blocks", "0"], "num_blocks=0: must be >= 1"),
    (["--chat-template", "/nonexistent.jinja"], "/nonexistent.jinja"),
])
def test_serve_bad_flags_are_one_line(flags, message, capsys):
    from llmjax.experiments import serve

    assert serve.main(["--model", "llama-tiny", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


@pytest.mark.slow
def test_serve_from_the_command_line(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments", "serve", "--model", "llama-tiny", "--port", str(port), "--api-key", "k",
         "--served-model-name", "m", "--num-blocks", "64", "--max-running", "4", "--max-tokens-per-step", "32",
         "--no-warmup", "--log-level", "warning"],
        cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the server did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            time.sleep(0.2)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0) as client:
            out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert out.usage.completion_tokens <= 3 and out.choices[0].finish_reason in ("stop", "length")
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert f"serving 'm' (context 64 tokens) on http://127.0.0.1:{port}/v1" in stderr


def test_end_of_text_ids_come_from_the_model_folder(tmp_path):
    from llmjax.experiments.serve import end_of_text_ids

    tokenizer = load_tokenizer("bytes")
    assert end_of_text_ids(None, tokenizer, ChatFormat()) == [256]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert end_of_text_ids(tmp_path, tokenizer, ChatFormat()) == [7, 9]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert end_of_text_ids(tmp_path, tokenizer, ChatFormat()) == [5]
    (tmp_path / "generation_config.json").unlink()
    assert end_of_text_ids(tmp_path, tokenizer, ChatFormat(eos_token="<|endoftext|>")) == [256]


def test_extra_stop_token_ids_end_every_request_but_ignore_eos(model):
    """The model's second end-of-text id (Llama 3's <|eot_id|>) stops a reply and is not part of its text."""
    params, cfg, tokenizer = model
    prompt = tokenizer.encode("x = ")
    free = generate(params, cfg, [prompt], max_new_tokens=8).tokens[0]  # no EOS: 8 tokens
    engine = Engine(params, cfg, EngineConfig(**ENGINE), eos_token_id=tokenizer.eot_id)
    app = create_app(engine, tokenizer, model_name=MODEL, max_model_len=cfg.max_seq_len, stop_token_ids=[free[3]])
    with running_server(app) as url, openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        cut = free.index(free[3])
        assert (out.choices[0].text, out.choices[0].finish_reason) == (tokenizer.decode(free[:cut]), "stop")
        assert out.usage.completion_tokens == cut + 1
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert (out.choices[0].text, out.usage.completion_tokens) == (tokenizer.decode(free), 8)


def test_serve_hf_takes_a_hub_id_and_names_the_model_by_it(tmp_path, monkeypatch, capsys):
    """--hf owner/name: served under that name (not its snapshot folder's); a hub id that cannot be fetched is one
    line naming the local-folder alternative."""
    from llmjax.experiments import serve

    monkeypatch.chdir(tmp_path)
    assert serve.default_model_name(serve.parse_args(["--hf", "HuggingFaceTB/SmolLM2-135M"])) == \
        "HuggingFaceTB/SmolLM2-135M"
    (tmp_path / "my-model").mkdir()
    assert serve.default_model_name(serve.parse_args(["--hf", "my-model"])) == "my-model"
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed: no network either way
    assert serve.main(["--hf", "owner/name"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m experiments serve: cannot fetch 'owner/name' from the Hugging Face hub")
    assert err.endswith("pass the local folder: --hf /path/to/folder (config.json + *.safetensors)")
    assert err.count("\n") == 0
