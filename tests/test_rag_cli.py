"""`python -m experiments rag index|ask` and `rag_eval loss|qa` end to end on a tiny corpus with a random tiny encoder
(preset:bert-tiny) and a random tiny language model (--model llama-tiny); bad input is one line and exit status 2."""

import json

import jax
import numpy as np
import pytest

from llmjax.experiments import rag, rag_eval

pytestmark = pytest.mark.filterwarnings("ignore:.*longer than max_len")

FILES = {f"lib/mod{i}.py": "".join(f"def helper_{i}_{j}(value):\n    return value + {i * j}  # helper\n"
                                   for j in range(5)) for i in range(6)}


@pytest.fixture(scope="module", autouse=True)
def fast_random_init():
    """Presets' random weights drawn by NumPy in init_params' shapes (init_params compiles for seconds on a busy
    CPU; the values do not matter here)."""
    import llmjax.model

    real = llmjax.model.init_params

    def init_params(cfg, key, *args, **kwargs):
        shapes = jax.eval_shape(lambda: real(cfg, key, *args, **kwargs))
        rng = np.random.default_rng(0)
        return jax.tree.map(lambda s: (1 + 0.05 * rng.standard_normal(s.shape)).astype(s.dtype) if len(s.shape) == 1
                            else (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)

    patch = pytest.MonkeyPatch()
    patch.setattr(llmjax.model, "init_params", init_params)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rag") / "index"
    assert rag.main(["index", "--encoder", "preset:bert-tiny", "--data", str(corpus), "--out", str(folder),
                     "--max-len", "16", "--chunk-chars", "120", "--no-progress"]) == 0
    return folder


def test_index_then_ask_prints_the_retrieved_keys_and_the_answer(index, capsys):
    capsys.readouterr()
    meta = json.loads((index / "meta.json").read_text())
    assert meta["encoder"]["name"] == "preset:bert-tiny" and meta["files"] == len(FILES)
    keys = [json.loads(line)["key"] for line in (index / "chunks.jsonl").read_text().splitlines()]
    assert len(keys) == meta["chunks"] and keys[0].startswith("lib/mod0.py:1-")
    assert rag.main(["ask", "--index", str(index), "--model", "llama-tiny", "-k", "2", "--max-new-tokens", "4",
                     "def helper(value):"]) == 0
    out = capsys.readouterr().out
    shown = [line.split()[2] for line in out.splitlines() if line.startswith("retrieved ")]
    assert len(shown) == 2 and set(shown) <= set(keys)
    assert "answer (" in out


@pytest.mark.parametrize("command, message", [
    (["ask", "-k", "1", "   "], "query is empty"),
    (["ask", "-k", "999", "def f"], "k=999 is larger than the index"),
    (["ask", "-k", "1", "--encoder", "preset:gpt2-tiny", "def f"], "was built with encoder preset:bert-tiny"),
])
def test_ask_bad_input_is_one_line(index, capsys, command, message):
    argv = [command[0], "--index", str(index), "--model", "llama-tiny", *command[1:]]
    assert rag.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("python -m experiments rag ask:")


def test_index_with_an_unknown_encoder_source(tmp_path, capsys):
    assert rag.main(["index", "--encoder", "nope", "--out", str(tmp_path / "x"), "--max-files", "1"]) == 2
    assert "--encoder 'nope': expected SOURCE:NAME" in capsys.readouterr().err


def test_rag_eval_loss_writes_the_table_json_and_png(index, corpus, tmp_path, capsys):
    out = tmp_path / "loss"
    assert rag_eval.main(["loss", "--index", str(index), "--model", "llama-tiny", "--data", str(corpus), "-k", "2",
                          "--context", "24", "--target", "8", "--neighbour-tokens", "12", "--query-tokens", "16",
                          "--per-file", "2", "--max-targets", "4", "--batch-size", "2", "--out", str(out),
                          "--no-progress"]) == 0
    record = json.loads((out / "rag_loss.json").read_text())
    assert record["targets"] >= 1 and np.isfinite([record["baseline"], record["rag"]]).all()
    assert record["delta"] == pytest.approx(record["baseline"] - record["rag"])
    assert [b["first"] for b in record["buckets"]] == [1, 2, 4, 8] and (out / "rag_loss.png").stat().st_size > 0
    assert "baseline" in capsys.readouterr().out
    assert rag_eval.main(["loss", "--index", str(index), "--model", "llama-tiny", "--data", str(corpus),
                          "--context", "60", "--target", "8", "--out", str(out)]) == 2
    assert "exceed the model's context" in capsys.readouterr().err


def test_rag_eval_qa_scores_with_and_without_retrieval(index, tmp_path, capsys):
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question": "Which adds 2?", "answer": "mod1.helper_1_2",
                                     "docstring": "return value + 2", "file": "lib/mod1.py"}) + "\n"
                         + json.dumps({"question": "Which adds 0?", "answer": "mod0.helper_0_0"}) + "\n")
    out = tmp_path / "qa"
    assert rag_eval.main(["qa", "--index", str(index), "--model", "llama-tiny", "--questions", str(questions),
                          "-k", "1", "--max-new-tokens", "4", "--batch-size", "1",  # the engine: few programs
                          "--shots", "0",  # the demonstrations do not fit llama-tiny's 64 tokens
                          "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "rag_qa.json").read_text())
    assert record["questions"] == 2 and 0 <= record["with_exact_match"] <= 1 and 0 <= record["without_exact_match"] <= 1
    assert all("with_answer" in r and "without_answer" in r for r in record["records"])
    assert len(record["records"][0]["retrieved"]) == 1 and (out / "rag_qa.png").stat().st_size > 0
    assert (out / "questions.jsonl").read_text().count("\n") == 2
    questions.write_text('{"question": "no answer"}\n')
    assert rag_eval.main(["qa", "--index", str(index), "--model", "llama-tiny", "--questions", str(questions),
                          "--out", str(out)]) == 2
    assert "line 1: expected an object with" in capsys.readouterr().err


def test_rag_eval_rows_writes_whole_rows_without_and_with_neighbours(index, corpus, tmp_path, capsys):
    from llmjax.data.loader import batch_at
    from llmjax.data.shards import TokenShards
    from llmjax.tokenizer import load_tokenizer

    out = tmp_path / "rows"
    argv = ["rows", "--index", str(index), "--tokenizer", "bytes", "--data", str(corpus), "-k", "2", "--context",
            "24", "--target", "8", "--neighbour-tokens", "12", "--query-tokens", "16", "--per-file", "2",
            "--validation-fraction", "0.01", "--batch-size", "3", "--out", str(out), "--no-progress"]
    assert rag_eval.main(argv) == 0
    record = json.loads((out / "rows.json").read_text())
    shards = TokenShards(out / "train")
    assert shards.row_length == 32 and record["rows"] == 2 * record["targets"] == shards.num_documents
    assert "--seq 31" in capsys.readouterr().out
    tokenizer = load_tokenizer("bytes")
    texts = [tokenizer.decode(shards.document(i).tolist()) for i in range(shards.num_documents)]
    for base, rag_row in zip(texts[0::2], texts[1::2]):
        assert any(base in text for text in FILES.values())  # 24 preceding bytes + 8 target bytes of a file
        assert rag_row[-8:] == base[-8:] and rag_row != base  # the same target after other context
        assert rag_row[-8 - 4:] == base[-8 - 4:]  # the neighbours leave the preceding text's last bytes in place
    assert len(batch_at(shards, 0, batch_size=4, seq_len=31, seed=0)[0]) == 32
    assert rag_eval.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert rag_eval.main(argv[:4] + ["nope-tokenizer"] + argv[5:] + ["--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m experiments rag_eval rows: --tokenizer nope-tokenizer")
    assert len(err.splitlines()) == 1
