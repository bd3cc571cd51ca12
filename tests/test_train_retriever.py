"""train_retriever on a tiny made-up library with bert-tiny: the loss goes down, the run reloads in retrieval_eval."""

import json

import numpy as np
import pytest

from llmjax.retrieval.base import RetrievalError
from llmjax.retrieval.code_task import write_synthetic_library


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return write_synthetic_library(tmp_path_factory.mktemp("library") / "src", modules=16, functions=3)


def _task_flags(library, tmp_path):
    return ["--root", str(library), "--heldout-fraction", "0.25", "--cache-dir", str(tmp_path / "cache")]


@pytest.fixture(scope="module")
def run(library, tmp_path_factory):
    """One short training run (bert-tiny, full fine-tuning, BM25 hard negatives), shared by the tests below."""
    from llmjax.experiments import train_retriever

    tmp_path = tmp_path_factory.mktemp("train")
    out = tmp_path / "run"
    assert train_retriever.main(["--init", "bert-tiny", "--steps", "12", "--batch", "16", "--hard-negatives", "bm25",
                                 "--num-hard", "2", "--hard-pool", "6", "--lr", "2e-3", "--warmup", "2",
                                 "--log-every", "1", "--eval-every", "6", "--query-max-len", "48",
                                 "--doc-max-len", "64", "--out", str(out), *_task_flags(library, tmp_path)]) == 0
    return out, tmp_path


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_run_reloads(library, run):
    from llmjax.experiments import retrieval_eval
    from llmjax.retrieval.dense import load_retriever

    out, tmp_path = run
    record = json.loads((out / "metrics.json").read_text())
    losses = [loss for _, loss in record["losses"]]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    assert [r["retriever"] for r in record["results"]] == ["bm25", "start (bert-tiny)", "trained"]
    assert [c["step"] for c in record["curve"]] == [0, 6, 12]
    assert json.loads((out / "progress.json").read_text())["curve"][-1]["step"] == 6
    assert record["curve"][-1]["mrr"] == record["results"][2]["mrr"]
    assert (out / "training.png").stat().st_size > 0 and (out / "retriever.json").is_file()

    retriever = load_retriever(out)  # the saved run: the same recall as measured at the end of training
    assert retriever.doc_max_len == 64 and retriever.dim == 48
    eval_out = tmp_path / "eval"
    assert retrieval_eval.main(["--retriever", str(out), "bm25", "--out", str(eval_out),
                                *_task_flags(library, tmp_path)]) == 0
    evaluated = json.loads((eval_out / "metrics.json").read_text())["results"]
    trained = record["results"][2]
    for metric in ("recall@1", "recall@10", "mrr"):
        assert evaluated[0][metric] == pytest.approx(trained[metric], abs=1e-9)
    assert evaluated[1]["mrr"] == pytest.approx(record["results"][0]["mrr"], abs=1e-9)

    # an index built by this retriever refuses another model's retriever (name or dimension)
    from llmjax.retrieval.dense import DenseRetriever, check_index

    index = retriever.index_documents(["def f(x):\n    return x", "class Stack:\n    pass"])
    other = DenseRetriever("minilm", retriever.query_params, retriever.doc_params, retriever.cfg, retriever.tokenizer)
    with pytest.raises(RetrievalError, match="rebuild the index"):
        check_index(index, other)
    from llmjax.retrieval.dense import load_document_index, save_document_index

    save_document_index(tmp_path / "docs.idx", index)
    assert load_document_index(tmp_path / "docs.idx", retriever).size == 2
    with pytest.raises(RetrievalError, match="'minilm' \\(dimension 48\\): rebuild the index"):
        load_document_index(tmp_path / "docs.idx", other)
    with pytest.raises(RetrievalError, match="larger than the document pool"):
        retriever.search(index, ["return the value"], k=3)
    with pytest.raises(RetrievalError, match=r"queries\[0\] is empty"):
        retriever.search(index, [""], k=1)


@pytest.mark.slow
def test_separate_lora_towers_and_hard_negative_mining(library, run):
    """The LoRA / separate-tower and index-mining pieces without another training compile (the CLI path of
    `--towers separate --lora-rank R --hard-negatives index` is the same step function)."""
    from types import SimpleNamespace

    from llmjax.experiments.retrieval_eval import load_task
    from llmjax.experiments.train_retriever import (
        drop_positives,
        index_candidates,
        make_trainable,
        retriever_of,
        sample_hard,
        tower_trees,
    )
    from llmjax.retrieval.dense import load_retriever

    base = load_retriever(run[0])  # the trained bert-tiny as the base model
    model = SimpleNamespace(params=base.doc_params, cfg=base.cfg, tokenizer=base.tokenizer)
    tmp_path = run[1]
    args = SimpleNamespace(towers="separate", lora_rank=2, lora_alpha=None, train_seed=0, query_max_len=48,
                           doc_max_len=64)
    trainable, frozen, lora_cfg = make_trainable(model.params, model.cfg, args)
    assert sorted(trainable) == ["doc", "query"] and lora_cfg.rank == 2
    trees = tower_trees(trainable, frozen, model.cfg, lora_cfg)
    kernel = model.params["blocks"]["attn"]["q"]["kernel"]
    np.testing.assert_allclose(trees["query"]["blocks"]["attn"]["q"]["kernel"], kernel)  # LoRA's B starts at 0

    task = load_task(SimpleNamespace(root=library, heldout_fraction=0.25, seed=0, max_examples=None,
                                     cache_dir=tmp_path / "cache"), progress=False)
    allowed = np.flatnonzero(np.asarray(task.doc_splits) != "test")
    mined = index_candidates(retriever_of(trees, model.cfg, model.tokenizer, args, "current"), task, allowed, 5,
                             batch_size=16)
    assert mined.shape == (len(task.train_queries), 5)
    assert not (mined == task.train_positives[:, None]).any() and np.isin(mined, allowed).all()

    assert drop_positives(np.array([[4, 7, 9], [1, 2, 3]]), np.array([7, 5]), 3).tolist() == [[4, 9, -1], [1, 2, 3]]
    rng = np.random.default_rng(0)
    candidates = np.array([[5, 6, -1, -1], [-1, -1, -1, -1]])
    hard = sample_hard(candidates, np.array([0, 1]), np.array([2, 3]), np.arange(8), 3, rng)
    assert hard.shape == (2, 3) and set(hard[0][:2]) == {5, 6} and 2 not in hard[0] and 3 not in hard[1]
    assert all(len(set(row)) == 3 for row in hard.tolist())


def test_bad_flags_are_one_line_errors(library, tmp_path, capsys):
    from llmjax.experiments import retrieval_eval, train_retriever

    with pytest.raises(SystemExit):
        train_retriever.main(["--init", "bert-tiny", "--batch", "1"])
    assert "at least 2 queries" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_retriever.main(["--init", "bert-tiny", "--num-hard", "9", "--hard-pool", "4"])
    assert "--num-hard=9 is larger than --hard-pool=4" in capsys.readouterr().err
    assert train_retriever.main(["--init", "no-such-preset", "--steps", "1", *_task_flags(library, tmp_path)]) == 2
    assert "no-such-preset" in capsys.readouterr().err
    assert retrieval_eval.main(["--retriever", str(tmp_path / "nothing"), *_task_flags(library, tmp_path)]) == 2
    assert "expected bm25, minilm or a run folder" in capsys.readouterr().err


def test_realm_rows_put_the_document_then_the_query_then_the_scored_code():
    """Each LM row: the retrieved document's first tokens right-aligned in its span, the query (as a comment) in
    its span, the positive's code last; code shorter than the target span is padded and masked out."""
    import argparse
    from types import SimpleNamespace

    from llmjax.experiments.train_retriever import RealmInputs

    class Chars:
        def encode(self, text):
            return [ord(c) for c in text]

    args = argparse.Namespace(lm_doc_tokens=5, lm_query_tokens=6, lm_target_tokens=4, marginal="sequence")
    docs = [np.array([1, 2, 3, 4, 5, 6][:5], np.int32), np.array([7, 8], np.int32)]
    targets = [np.array([11, 12, 13, 14], np.int32), np.array([15, 16], np.int32)]
    inputs = RealmInputs(SimpleNamespace(tokenizer=Chars()), docs, targets, 0, args)
    rows, mask = inputs.rows(["ab"], np.array([[1, 0, -1]]), np.array([1]))
    query = [ord(c) for c in "\n# ab\n"]
    assert rows.shape == (1, 3, 15) and mask.tolist() == [[True, True, False, False]]
    assert rows[0, 0].tolist() == [0, 0, 0, 7, 8, *query, 15, 16, 0, 0]
    assert rows[0, 1].tolist() == [1, 2, 3, 4, 5, *query, 15, 16, 0, 0]
    assert rows[0, 2].tolist() == [0] * 5 + query + [15, 16, 0, 0]  # -1: no document


@pytest.mark.slow
def test_realm_objective_trains_the_towers_through_a_frozen_lm(library, tmp_path):
    from llmjax.experiments import train_retriever

    out = tmp_path / "realm"
    assert train_retriever.main(["--objective", "realm", "--lm", "preset:llama-tiny", "--init", "bert-tiny",
                                 "--steps", "4", "--batch", "4", "--realm-k", "3", "--lm-doc-tokens", "24",
                                 "--lm-query-tokens", "16", "--lm-target-tokens", "16", "--realm-eval-queries", "4",
                                 "--refresh-every", "2", "--lr", "1e-3", "--warmup", "1", "--log-every", "1",
                                 "--query-max-len", "32", "--doc-max-len", "48", "--out", str(out),
                                 *_task_flags(library, tmp_path)]) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["objective"] == "realm" and np.isfinite(record["lm_alone_rag_loss"])
    assert [r["retriever"] for r in record["results"]] == ["bm25", "start (bert-tiny)", "trained"]
    for result in record["results"][1:]:
        assert np.isfinite(result["rag_loss"]) and result["rag_k"] == 3 and result["rag_queries"] == 4
    assert len(record["losses"]) == 4 and all(np.isfinite([loss for _, loss in record["losses"]]))


def test_realm_needs_a_language_model(capsys):
    from llmjax.experiments import train_retriever

    with pytest.raises(SystemExit) as exit_info:
        train_retriever.parse_args(["--objective", "realm"])
    assert exit_info.value.code == 2
    assert "--objective realm needs --lm" in capsys.readouterr().err
