"""python -m experiments curate: kill-and-resume equality, bad input counted, report and PNG, shards out."""

import json

import numpy as np
import pytest

from llmjax.experiments import curate


VOCABULARY = ("river mountain window garden teacher morning evening yellow quiet market bread letter answer "
              "travel summer winter forest island music doctor family kitchen pocket silver orange simple "
              "believe happen remember follow explain wonder carry listen bright gentle careful famous").split()


def prose(i):
    """80 words drawn from a small vocabulary, seeded by i: passes the quality rules, differs per i."""
    rng = np.random.default_rng(i)
    words = [VOCABULARY[k] for k in rng.integers(len(VOCABULARY), size=80)]
    return " ".join(words[:40]) + ".\n" + " ".join(words[40:]) + "."


def write_corpus(folder):
    lines = [json.dumps({"text": prose(i)}) for i in range(30)]
    lines.insert(5, "{not json")
    lines.insert(9, json.dumps({"title": "no text field"}))
    lines.append(json.dumps({"text": prose(3)}))  # exact duplicate of document 3
    lines.append(json.dumps({"text": "zebra " + prose(4).split(" ", 1)[1]}))  # near-duplicate of 4: one word changed
    lines.append(json.dumps({"text": ""}))  # empty
    lines.append(json.dumps({"text": "too short to keep"}))  # fails the word-count rule
    lines.append(json.dumps({"text": "mail me at someone@example.com " + prose(40)}))
    data = folder / "in.jsonl"
    bad_utf8 = json.dumps({"text": "bad @@ bytes " + prose(50)}).encode().replace(b"@@", b"\xff")
    data.write_bytes(("\n".join(lines) + "\n").encode() + bad_utf8 + b"\n")
    return data


def run(data, out, *extra):
    return curate.main(["--data", str(data), "--out", str(out), "--no-progress", "--line-dedup", "none", *extra])


def test_killed_and_resumed_run_writes_the_same_output(tmp_path):
    data = write_corpus(tmp_path)
    assert run(data, tmp_path / "whole") == 0
    # stopped inside the quality stage
    assert run(data, tmp_path / "resumed", "--stop-after", "10", "--batch-documents", "5") == 3
    state = json.loads(next((tmp_path / "resumed" / "work").glob("*_quality.state.json")).read_text())
    assert state["documents"] == 10 and not state["done"]
    assert run(data, tmp_path / "resumed", "--batch-documents", "5") == 0
    whole = (tmp_path / "whole" / "curated.jsonl").read_bytes()
    assert whole == (tmp_path / "resumed" / "curated.jsonl").read_bytes()
    assert (tmp_path / "whole" / "removals.png").stat().st_size > 0

    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    read = stages["read"]
    assert read["skipped_lines"] == {"not_json": 1, "no_text_string": 1}
    assert read["skipped_line_numbers"]["not_json"] == [f"{data}:6"]
    assert read["removed_by_reason"] == {"empty": 1}
    assert read["invalid_utf8_documents"] == 1 and read["invalid_utf8_sequences_replaced"] == 1
    assert stages["exact"]["removed_by_reason"] == {"duplicate_document": 1}
    assert stages["minhash"]["removed_by_reason"] == {"near_duplicate": 1}
    assert stages["pii"]["masked"] == {"email": 1}
    texts = [json.loads(line)["text"] for line in whole.decode().splitlines()]
    assert stages["quality"]["removed_by_reason"] == {"word_count": 1}
    assert len(texts) == stages["pii"]["documents_out"] == 36 - 4  # 36 documents read
    assert any("\ufffd" in t for t in texts) and not any("someone@example.com" in t for t in texts)
    assert texts[0] == prose(0)  # order kept; the first occurrence kept


def test_shards_output_and_workers(tmp_path):
    data = write_corpus(tmp_path)
    assert run(data, tmp_path / "out", "--format", "shards", "--workers", "2", "--stages", "exact,pii") == 0
    index = json.loads((tmp_path / "out" / "shards" / "index.json").read_text())
    texts = [json.loads(line)["text"] for line in next((tmp_path / "out" / "work").glob("*_pii.jsonl")).open()]
    assert index["num_documents"] == len(texts) == 34  # 36 documents: 1 empty, 1 exact duplicate removed
    assert index["total_tokens"] == sum(len(t.encode()) + 1 for t in texts)  # bytes + one end-of-text each


@pytest.mark.parametrize("flags, message", [(["--stages", "exact,bogus"], "bogus"), (["--workers", "0"], "--workers"),
                                            (["--num-perm", "128", "--bands", "7"], "bands")])
def test_bad_flags(tmp_path, capsys, flags, message):
    assert run(tmp_path / "missing.jsonl", tmp_path / "out", *flags) == 2
    assert message in capsys.readouterr().err


def test_missing_input_is_one_clear_error(tmp_path, capsys):
    assert run(tmp_path / "missing.jsonl", tmp_path / "out") == 1
    assert "missing.jsonl" in capsys.readouterr().err


def test_classifier_stage(tmp_path, capsys):
    from llmjax.data.curate.classifier import QualityClassifier

    weights = np.zeros(64, np.float32)
    weights[1] = 20.0  # statistic 1: share of letters and spaces; P(good) >= 0.5 when it is >= 0.6
    QualityClassifier(weights, -12.0).save(tmp_path / "q.npz")
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in [prose(1), "#$%& *(){} <>?| 12 ~~ " * 10, prose(2)]))
    flags = ["--stages", "classifier", "--classifier", str(tmp_path / "q.npz")]
    assert run(data, tmp_path / "out", *flags, "--workers", "2") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stages"][1]["removed_by_reason"] == {"low_quality_score": 1}
    kept = [json.loads(line)["text"] for line in (tmp_path / "out" / "curated.jsonl").open()]
    assert kept == [prose(1), prose(2)]
    assert run(data, tmp_path / "out2", "--stages", "classifier") == 2
    assert "--classifier" in capsys.readouterr().err
