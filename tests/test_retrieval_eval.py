"""retrieval_eval on a tiny made-up library: BM25's metrics equal a textbook-BM25 ranking's, MiniLM runs, bad flags."""

import json

import numpy as np
import pytest

from llmjax.retrieval.code_task import load_code_task, rank_metrics, write_synthetic_library


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return write_synthetic_library(tmp_path_factory.mktemp("library") / "src", modules=16, functions=3, seed=1)


def test_bm25_metrics_match_a_textbook_ranking(library, tmp_path):
    from llmjax.experiments import retrieval_eval
    from llmjax.retrieval.bm25 import bm25_reference

    flags = ["--root", str(library), "--heldout-fraction", "0.25", "--cache-dir", str(tmp_path / "cache")]
    assert retrieval_eval.main(["--retriever", "bm25", "--out", str(tmp_path / "out"), *flags]) == 0
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (tmp_path / "out" / "recall.png").stat().st_size > 0
    task = load_code_task(library, heldout_fraction=0.25, cache_dir=None)
    assert record["test_queries"] == len(task.test_queries) and record["documents"] == len(task.documents)
    ranked = []
    for query in task.test_queries:  # best first, ties: the lower row first (as BM25Index.search)
        scores = bm25_reference(task.documents, query)
        ranked.append(np.lexsort((np.arange(len(scores)), -scores))[:100])
    want = rank_metrics(np.stack(ranked), task.test_positives)
    got = record["results"][0]
    assert got["retriever"] == "bm25"
    for metric, value in want.items():
        assert got[metric] == pytest.approx(value, abs=1e-9)
    # --task: the cached task file used as is (another machine's Python would otherwise make its own task)
    (task_file,) = (tmp_path / "cache").glob("code_task-*.json")
    assert retrieval_eval.main(["--retriever", "bm25", "--task", str(task_file), "--root", str(tmp_path / "none"),
                                "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["results"][0]
    assert {m: again[m] for m in want} == {m: got[m] for m in want}
    (tmp_path / "broken.json").write_text("{")
    assert retrieval_eval.main(["--task", str(tmp_path / "broken.json"), "--out", str(tmp_path / "x")]) == 2


def test_minilm_on_a_few_queries(library, tmp_path):
    from llmjax.experiments import retrieval_eval

    out = tmp_path / "out"
    assert retrieval_eval.main(["--retriever", "minilm", "--max-test-queries", "4", "--root", str(library),
                                "--heldout-fraction", "0.25", "--cache-dir", str(tmp_path / "cache"),
                                "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())["results"][0]
    assert result["retriever"] == "minilm" and json.loads((out / "metrics.json").read_text())["test_queries"] == 4
    assert result["recall@100"] == 1.0 and result["mrr"] > 0.2  # the pool (< 100 documents) is returned whole


def test_bad_flags(tmp_path, capsys):
    from llmjax.experiments import retrieval_eval

    with pytest.raises(SystemExit):
        retrieval_eval.main(["--max-examples", "0"])
    assert "--max-examples=0: must be a positive integer" in capsys.readouterr().err
    assert retrieval_eval.main(["--root", str(tmp_path / "missing"), "--cache-dir", str(tmp_path)]) == 2
    assert "not a folder of .py files" in capsys.readouterr().err
