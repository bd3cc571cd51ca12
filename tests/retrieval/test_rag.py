"""llmjax.retrieval.rag / rag_eval: chunking, prompt assembly within the budget (chunks dropped in rank order, the
last kept one cut, the query never cut), the held-out file's own chunks never retrieved, the index's encoder
metadata checked, bad input (k larger than the index, an empty query), the target-only loss against a direct
float64 computation, and the QA set and exact-match scorer."""

import json
import warnings

import jax
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.data.corpus import CorpusFile
from llmjax.model import init_params
from llmjax.retrieval.rag import (Chunk, Encoder, RagError, Retrieved, build_prompt, build_rag_index, chunk_text,
                                  fit_pieces, load_rag_index, retrieve, retrieve_many, with_continuation)
from llmjax.retrieval.rag_eval import (LossTarget, exact_match, function_mentioned, name_mentioned, neighbour_context,
                                       normalize_answer, rag_loss_eval, stdlib_questions)
from llmjax.tokenizer.bytes import ByteTokenizer
from llmjax.tokenizer.chat import ChatFormat

TOKENIZER = ByteTokenizer()  # one token per byte: budgets are easy to count
DOCUMENTS = [(f"pkg/mod{f}.py", "".join(f"def f{f}_{i}(x):\n    return x * {f} + {i}  # file {f}\n" for i in range(6)))
             for f in range(4)]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def random_params(cfg, seed: int = 0) -> dict:
    """Random parameters of init_params' shapes, drawn by NumPy (init_params itself compiles for seconds on a busy
    2-core CPU): norm scales near 1, everything else small."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

    def draw(path, shape):
        noise = rng.standard_normal(shape.shape).astype(shape.dtype)
        return 1 + 0.1 * noise if "scale" in jax.tree_util.keystr(path) else 0.05 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def make_encoder(name="preset:bert-tiny", seed=0, pooling="mean"):
    """A random bert-tiny over bytes; max_len 16: one bucket, one compile for every batch."""
    cfg = get_config("bert-tiny", vocab_size=TOKENIZER.vocab_size)
    return Encoder(name, random_params(cfg, seed), cfg, TOKENIZER, pooling, True, 16, 64)


@pytest.fixture(scope="module")
def encoder():
    return make_encoder()


@pytest.fixture(scope="module")
def store(encoder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rag") / "index"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # chunks longer than max_len=16 are cut (warned)
        built = build_rag_index(DOCUMENTS, encoder, folder, chunk_chars=70)
    return built


def test_chunks_are_whole_lines_within_the_size():
    text = "a = 1\n\n\n" + "b" * 25 + "\nc = 3\n        \n"
    chunks = chunk_text(text, "x.py", max_chars=10)
    assert all(len(c.text) <= 10 for c in chunks)
    assert "".join(c.text for c in chunks) == text.replace("        \n", "")  # whitespace-only chunks left out
    assert chunks[0].key == "x.py:1-3" and chunks[1].key == "x.py:4-4" and chunks[-1].key == "x.py:5-5"
    with pytest.raises(RagError, match="chunk_chars"):
        chunk_text(text, "x.py", max_chars=0)


def retrieved(*texts):
    return [Retrieved(Chunk(f"f{i}.py:1-1", f"f{i}.py", text), 1.0 - i / 10, i) for i, text in enumerate(texts)]


def piece(chunk: Retrieved) -> list[int]:
    return TOKENIZER.encode(f"# source: {chunk.chunk.key}\n{chunk.chunk.text}") + TOKENIZER.encode("\n\n")


def test_prompt_drops_the_lowest_ranked_chunks_then_cuts_the_last_kept_one():
    chunks = retrieved("A" * 30, "B" * 30, "C" * 30)
    query = "def f(x):"
    full = [piece(c) for c in chunks]  # 19-byte header + 30 + 2 each: 51 tokens
    budget = len(full[0]) + 20 + len(query)  # the first whole, 20 tokens for the second, none for the third
    prompt = build_prompt(query, chunks, TOKENIZER, budget)
    expected_second = full[1][:18] + full[1][-2:]  # cut to the room left, its blank-line separator kept
    assert prompt.ids == full[0] + expected_second + TOKENIZER.encode(query)
    assert len(prompt.ids) == budget and prompt.kept == chunks[:2] and prompt.dropped == 1
    assert prompt.cut_tokens == len(full[1]) - 20
    everything = build_prompt(query, chunks, TOKENIZER, 10_000)
    assert everything.ids == full[0] + full[1] + full[2] + TOKENIZER.encode(query) and everything.dropped == 0
    # room for the query only: no chunk at all, and the query whole
    assert build_prompt(query, chunks, TOKENIZER, len(query)).ids == TOKENIZER.encode(query)


def test_the_query_is_never_cut():
    with pytest.raises(RagError, match="query alone takes 12 tokens.*budget of 11"):
        build_prompt("x" * 12, retrieved("A"), TOKENIZER, 11)
    with pytest.raises(RagError, match="query is empty"):
        build_prompt("  \n", retrieved("A"), TOKENIZER, 100)


def test_fit_pieces_drops_a_stub_rather_than_keep_it():
    assert fit_pieces([[1] * 5, [2] * 10], 9, min_cut=8) == [[1] * 5]
    assert fit_pieces([[1] * 5, [2] * 10], 13, min_cut=8) == [[1] * 5, [2] * 8]


def test_chat_prompt_renders_the_template_around_the_context():
    chat = ChatFormat.create(CHATML)
    chunks = retrieved("print('hello')")
    prompt = build_prompt("What does it print?", chunks, TOKENIZER, 500, chat_format=chat)
    assert prompt.text.startswith("<|im_start|>user\nUse the context below")
    assert "# source: f0.py:1-1\nprint('hello')\n\nQuestion: What does it print?<|im_end|>\n" in prompt.text
    assert prompt.text.endswith("<|im_start|>assistant\n")
    alone = build_prompt("What does it print?", [], TOKENIZER, 500, chat_format=chat)  # no retrieval: the question
    assert alone.text == "<|im_start|>user\nWhat does it print?<|im_end|>\n<|im_start|>assistant\n"


pytestmark = pytest.mark.filterwarnings("ignore:.*longer than max_len")


def test_retrieval_never_returns_the_excluded_file(store, encoder):
    query = store.chunks[store.file_rows["pkg/mod2.py"][0]].text
    nearest = retrieve(store, encoder, query, k=3)
    assert nearest[0].chunk.file == "pkg/mod2.py"  # the file's own chunk is the nearest when allowed
    for k in (3, store.size - len(store.file_rows["pkg/mod2.py"])):  # few k: each search k compiles once
        found = retrieve(store, encoder, query, k=k, exclude_file="pkg/mod2.py")
        assert len(found) == k and all(r.chunk.file != "pkg/mod2.py" for r in found)
        assert [r.rank for r in found] == list(range(k)) and all(a.score >= b.score for a, b in zip(found, found[1:]))
    many = retrieve_many(store, encoder, [query, query], k=3, exclude_files=["pkg/mod2.py", None])
    assert many[0][0].chunk.file != "pkg/mod2.py" and many[1][0].chunk.file == "pkg/mod2.py"


def test_bad_queries_and_k(store, encoder):
    with pytest.raises(RagError, match=f"k=99 is larger than the index \\({store.size} chunks\\)"):
        retrieve(store, encoder, "def f", k=99)
    with pytest.raises(RagError, match="k=0"):
        retrieve(store, encoder, "def f", k=0)
    with pytest.raises(RagError, match="query is empty"):
        retrieve(store, encoder, "", k=1)


def test_saved_store_loads_the_same_and_checks_the_encoder(store, encoder):
    loaded = load_rag_index(store.path, encoder)
    assert loaded.chunks == store.chunks and loaded.meta["encoder"] == encoder.metadata()
    assert json.loads((store.path / "meta.json").read_text())["chunking"]["chunk_chars"] == 70
    query = store.chunks[3].text
    same = [r.chunk for r in retrieve(store, encoder, query, 3)]
    assert [r.chunk for r in retrieve(loaded, encoder, query, 3)] == same
    other = make_encoder("preset:other-encoder", seed=1)
    with pytest.raises(RagError, match="built with encoder preset:bert-tiny .* query encoder is preset:other-encoder"):
        load_rag_index(store.path, other)
    wider = Encoder("preset:bert-tiny", None, get_config("bert-tiny", d_model=64, num_heads=4), TOKENIZER)
    with pytest.raises(RagError, match="dim 64.*dim differ"):
        load_rag_index(store.path, wider)
    with pytest.raises(RagError, match="no RAG index here"):
        load_rag_index(store.path.parent / "missing")


@pytest.fixture(scope="module")
def language_model():
    cfg = get_config("llama-tiny", vocab_size=TOKENIZER.vocab_size)
    return random_params(cfg, 1), cfg


def direct_target_losses(params, cfg, rows: np.ndarray, num_targets: int) -> np.ndarray:
    """float64 [rows, num_targets]: the model's logits on the whole rows, log-softmax in NumPy, the last targets'
    losses."""
    from llmjax.model.transformer import forward

    logits = np.asarray(forward(params, rows[:, :-1], cfg), np.float64)[..., : cfg.vocab_size]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, rows[:, 1:, None], axis=-1)[:, -num_targets:, 0]


def test_loss_with_neighbours_scores_only_the_target_tokens(store, encoder, language_model):
    params, cfg = language_model
    rng = np.random.default_rng(0)
    context, length = 24, 6
    targets = [LossTarget(f"pkg/mod{i % 4}.py", 40, rng.integers(0, 256, context).astype(np.int32),
                          rng.integers(0, 256, length).astype(np.int32)) for i in range(3)]
    record = rag_loss_eval(store, encoder, params, cfg, TOKENIZER, targets, k=3, context=context, neighbour_tokens=12,
                           query_tokens=16, batch_size=2, neighbour_text="chunk")
    separator = len(TOKENIZER.encode("\n\n"))
    rows = []
    for t in targets:
        neighbours = retrieve(store, encoder, TOKENIZER.decode(t.preceding[-16:].tolist()), 3, exclude_file=t.file)
        assert all(n.chunk.file != t.file for n in neighbours)
        with_neighbours = neighbour_context([piece(n) for n in neighbours], t.preceding, context, 12, separator)
        assert len(with_neighbours) == context and with_neighbours[:12].tolist() == piece(neighbours[0])[:10] + [10, 10]
        assert with_neighbours[12:].tolist() == t.preceding[-12:].tolist()
        rows += [np.concatenate([t.preceding, t.target]), np.concatenate([with_neighbours, t.target])]
    losses = direct_target_losses(params, cfg, np.stack(rows), length)  # [2 * targets, length]
    baseline, rag = losses[0::2], losses[1::2]
    np.testing.assert_allclose(record["per_position_baseline"], np.mean(baseline, 0), atol=2e-4)
    np.testing.assert_allclose(record["per_position_rag"], np.mean(rag, 0), atol=2e-4)
    np.testing.assert_allclose([record["baseline"], record["rag"]], [np.mean(baseline), np.mean(rag)], atol=2e-4)
    assert record["delta"] == pytest.approx(record["baseline"] - record["rag"])
    assert [(b["first"], b["last"]) for b in record["buckets"]] == [(1, 1), (2, 3), (4, 6)]
    with pytest.raises(RagError, match="no held-out target chunks"):
        rag_loss_eval(store, encoder, params, cfg, TOKENIZER, [], context=context, neighbour_tokens=12)


def test_a_continuation_is_the_next_chunk_of_the_same_file(store):
    rows = store.file_rows["pkg/mod1.py"]
    first, last = (Retrieved(store.chunks[i], 0.5, 0, i) for i in (rows[0], rows[-1]))
    joined = with_continuation(store, first)
    assert joined.chunk.text == store.chunks[rows[0]].text + store.chunks[rows[1]].text
    assert joined.chunk.key == f"pkg/mod1.py:1-{store.chunks[rows[1]].key.rsplit('-', 1)[1]}"
    assert with_continuation(store, last) == last  # the file's last chunk: nothing of the next file joins it
    assert store.chunks[rows[-1] + 1].file != "pkg/mod1.py"


@pytest.mark.parametrize("prediction, right", [
    ("textwrap.dedent", True), ("`textwrap.dedent`", True), ("Answer: textwrap.dedent.", True),
    ("**textwrap.dedent(text)**\nIt removes indentation.", True), ("The function is TEXTWRAP.DEDENT", True),
    ("dedent", False), ("textwrap.indent", False), ("", False), ("It is textwrap.dedent, I think", True)])
def test_exact_match_after_normalisation(prediction, right):
    assert exact_match(prediction, "textwrap.dedent") is right


def test_aliases_count_as_the_answer():
    assert exact_match("asyncio.gather", "asyncio.tasks.gather", ["asyncio.gather"])
    assert not exact_match("asyncio.gather", "asyncio.tasks.gather")
    assert name_mentioned("use asyncio.gather here", "asyncio.tasks.gather", ["asyncio.gather"])


def test_name_mentioned_is_whole_names_only():
    assert name_mentioned("I think it is textwrap.dedent, yes", "textwrap.dedent")
    assert not name_mentioned("textwrap.dedented", "textwrap.dedent")
    assert not name_mentioned("mytextwrap.dedent", "textwrap.dedent")
    assert normalize_answer("  \n  `os.path.join()`  ") == "os.path.join"
    assert function_mentioned("def copy_location(new_node, old_node):", "ast.copy_location")
    assert not function_mentioned("copy_locations", "ast.copy_location")


def test_questions_come_from_public_functions_deterministically(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "sub.py").write_text(
        'def knead(dough):\n    """Work the dough until it is smooth and springs back when pressed."""\n')
    (tmp_path / "pkg" / "__init__.py").write_text('from .sub import *\n\n'

        'def spread(x):\n    """Spread the butter evenly over every slice of the bread."""\n\n'
        'def _hidden():\n    """A private helper that nobody should ever be asked about."""\n\n'
        'def named():\n    """The function named gives away its own name in this docstring."""\n')
    (tmp_path / "tools.py").write_text(
        'def hammer(nail):\n    """Drive the nail into the wall with a single firm blow.\n\n    More text."""\n'
        'def short():\n    """Too short."""\n')
    (tmp_path / "_private.py").write_text('def leak():\n    """This module is private so no question is made."""\n')
    files = [CorpusFile(p, p.relative_to(tmp_path).as_posix()) for p in sorted(tmp_path.rglob("*.py"))]
    questions = stdlib_questions(10, files)
    assert sorted(q["answer"] for q in questions) == ["pkg.spread", "pkg.sub.knead", "tools.hammer"]
    assert {q["answer"]: q["aliases"] for q in questions}["pkg.sub.knead"] == ["pkg.knead"]
    hammer = next(q for q in questions if q["answer"] == "tools.hammer")
    assert hammer["docstring"] == "Drive the nail into the wall with a single firm blow."
    assert hammer["file"] == "tools.py"
    assert hammer["docstring"] in hammer["question"]
    assert stdlib_questions(10, files) == questions and len(stdlib_questions(1, files)) == 1
