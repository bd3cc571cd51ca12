"""Long-context evaluation: passkey prompts put the needle where they say, the scorers count right and wrong answers,
loss-by-position buckets, and `python -m experiments needle` end to end on a tiny random run (bad input in one line)."""

import json

import jax
import numpy as np
import pytest

from llmjax import long_context
from llmjax.experiments import needle as experiment
from llmjax.long_context import LongContextError, needle_prompt, position_buckets
from llmjax.tokenizer import load_tokenizer

FILLER_TEXT = "def f(x):\n    return x * 2  # a line of filler code\n" * 40


@pytest.fixture(scope="module")
def byte_tokenizer():
    return load_tokenizer("bytes")


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE (multi-byte tokens: the needle is cut at token, not byte, boundaries)."""
    from llmjax.tokenizer.bpe_train import train_bpe

    return train_bpe([FILLER_TEXT + "The pass key is 12345. Remember it. What is the pass key?"], 300,
                     progress=False, num_workers=1)


@pytest.fixture(scope="module")
def tiny_model():
    """(train state, model config, train config) of a random llama-tiny (context 512) over the byte vocabulary."""
    from llmjax.config import TrainConfig, get_config
    from llmjax.train.state import init_train_state

    cfg = get_config("llama-tiny", vocab_size=load_tokenizer("bytes").vocab_size, max_seq_len=512)
    train_cfg = TrainConfig()
    return init_train_state(cfg, train_cfg, jax.random.key(0)), cfg, train_cfg


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    """A run folder as the trainer leaves it: tiny_model's checkpoint and the byte tokenizer."""
    from llmjax.train.checkpoint import Checkpointer, run_record

    state, cfg, train_cfg = tiny_model
    folder = tmp_path_factory.mktemp("needle_run")
    checkpointer = Checkpointer(folder / "checkpoints", async_save=False)
    checkpointer.save(state, record=run_record(cfg, train_cfg, loader_state={"step": 0, "seed": 0}, seed=0))
    checkpointer.close()
    load_tokenizer("bytes").save(folder / "tokenizer.json")
    return folder


# --- prompts ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokenizer_name", ["byte_tokenizer", "bpe_tokenizer"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_the_needle_sits_where_the_prompt_says(tokenizer_name, depth, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    filler = np.asarray(tokenizer.encode(FILLER_TEXT))
    prompt = needle_prompt(tokenizer, filler, 200, depth, 40917)
    tokens = prompt.tokens
    assert tokens.shape == (200,) and tokens.dtype == np.int32
    assert tokenizer.decode(tokens[prompt.needle_start : prompt.needle_end]) == prompt.needle
    assert prompt.needle == "The pass key is 40917. Remember it. 40917 is the pass key."
    assert tokenizer.decode(prompt.answer) == " 40917"
    assert tokenizer.decode(tokens).endswith("\nWhat is the pass key? The pass key is")
    # everything but the needle's line and the question is the filler's first tokens, in order
    newline = len(tokenizer.encode("\n"))
    question = len(tokenizer.encode("\nWhat is the pass key? The pass key is"))
    rest = np.concatenate([tokens[: prompt.needle_start - newline], tokens[prompt.needle_end + newline : -question]])
    np.testing.assert_array_equal(rest, filler[: len(rest)])
    filler_before = prompt.needle_start - newline
    assert filler_before == round(depth * len(rest))
    if depth == 0.0:
        assert tokenizer.decode(tokens[: prompt.needle_start]) == "\n"
    if depth == 1.0:
        assert tokenizer.decode(tokens[prompt.needle_end :]) == "\n\nWhat is the pass key? The pass key is"


def test_prompt_bad_input_is_one_clear_error(byte_tokenizer):
    filler = byte_tokenizer.encode(FILLER_TEXT)
    for depth in (-0.1, 1.5):
        with pytest.raises(LongContextError, match=rf"depth={depth}: must be in \[0, 1\]"):
            needle_prompt(byte_tokenizer, filler, 200, depth, 12345)
    overhead = long_context.needle_overhead(byte_tokenizer, 12345)
    with pytest.raises(LongContextError, match=f"length=50: the needle and question alone take {overhead} tokens"):
        needle_prompt(byte_tokenizer, filler, 50, 0.5, 12345)
    assert needle_prompt(byte_tokenizer, filler, overhead, 0.5, 12345).length == overhead  # no filler at all
    with pytest.raises(LongContextError, match="the filler has 10 tokens"):
        needle_prompt(byte_tokenizer, filler[:10], 200, 0.5, 12345)
    with pytest.raises(LongContextError, match="passkey='12a4'"):
        needle_prompt(byte_tokenizer, filler, 200, 0.5, "12a4")


# --- scoring ---------------------------------------------------------------------------------------------------

def test_answers_count_as_correct_only_when_the_digits_match(byte_tokenizer):
    encode = byte_tokenizer.encode
    assert long_context.answer_correct(byte_tokenizer, encode(" 40917"), "40917")
    assert long_context.answer_correct(byte_tokenizer, encode(" 40917."), "40917")
    assert not long_context.answer_correct(byte_tokenizer, encode(" 40918"), "40917")
    assert not long_context.answer_correct(byte_tokenizer, encode(" 4091"), "40917")
    assert not long_context.answer_correct(byte_tokenizer, encode(" the k"), "40917")


def test_score_prompts_with_a_stub_model(byte_tokenizer, monkeypatch):
    """Generation stubbed (the first prompt answered right, the second wrong) and the teacher-forced argmax stubbed
    (an oracle that predicts each next token, then one that predicts token 0)."""
    filler = byte_tokenizer.encode(FILLER_TEXT)
    prompts = [needle_prompt(byte_tokenizer, filler, 150, 0.5, key) for key in ("11111", "22222")]

    def generated(params, cfg, asked, prepared=None):
        assert [p.passkey for p in asked] == ["11111", "22222"]
        return [byte_tokenizer.encode(" 11111"), byte_tokenizer.encode(" 22223")]

    def oracle(params, tokens, cfg, tail):  # fed prompt + answer[:-1], it predicts each next token (the answer's too)
        full = np.stack([np.concatenate([p.tokens, p.answer]) for p in prompts])
        assert full[:, :-1].tolist() == np.asarray(tokens).tolist()
        return full[:, -tail:]

    monkeypatch.setattr(long_context, "generated_answers", generated)
    monkeypatch.setattr(long_context, "_predictions", oracle)
    records = long_context.score_prompts(None, None, byte_tokenizer, prompts)
    assert [r["correct"] for r in records] == [True, False]
    assert [r["teacher_forced"] for r in records] == [True, True]
    assert [r["output"] for r in records] == [" 11111", " 22223"]
    monkeypatch.setattr(long_context, "_predictions", lambda params, tokens, cfg, tail: np.zeros((2, tail), np.int32))
    records = long_context.score_prompts(None, None, byte_tokenizer, prompts, scoring="teacher-forced")
    assert [(r["correct"], r["teacher_forced"]) for r in records] == [(False, False), (False, False)]
    assert "output" not in records[0]
    with pytest.raises(LongContextError, match="scoring='beam'"):
        long_context.score_prompts(None, None, byte_tokenizer, prompts, scoring="beam")


# --- loss by position ------------------------------------------------------------------------------------------

def test_log2_buckets_of_context_length():
    buckets = position_buckets(np.arange(1.0, 11.0))  # the loss at context length p is p
    assert [(b["first"], b["last"], b["positions"]) for b in buckets] == [(1, 1, 1), (2, 3, 2), (4, 7, 4), (8, 10, 3)]
    assert [b["mean_loss"] for b in buckets] == [1.0, 2.5, 5.5, 9.0]
    assert [b["last"] for b in position_buckets(np.ones(15))] == [1, 3, 7, 15]
    assert position_buckets([]) == []


def test_loss_by_position_matches_the_stream_loss(tiny_model):
    """Per-position losses of one document sum to evaluation.stream_nll's total over it, and a batch's are the mean
    of its rows' (every call the same shape: one compilation)."""
    from llmjax.evaluation import stream_nll

    state, cfg, _ = tiny_model
    params = state.params
    first, second = np.random.default_rng(0).integers(0, 257, (2, 40)).astype(np.int32)
    mixed = long_context.loss_by_position(params, cfg, np.stack([first, second]))
    only_first = long_context.loss_by_position(params, cfg, np.stack([first, first]))
    only_second = long_context.loss_by_position(params, cfg, np.stack([second, second]))
    assert mixed.shape == (39,)
    np.testing.assert_allclose(mixed, (only_first + only_second) / 2, rtol=1e-5)
    total, count = stream_nll(params, cfg, first, window=40, stride=39)
    assert count == 39
    np.testing.assert_allclose(only_first.sum(), total, rtol=1e-4)
    with pytest.raises(LongContextError, match="more than the model's context of 512"):
        long_context.loss_by_position(params, cfg, np.zeros((1, 514), np.int32))


# --- the experiment --------------------------------------------------------------------------------------------

def test_needle_experiment_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert experiment.main(["--ckpt", str(tiny_run), "--lengths", "128,200", "--depths", "0,0.5,1", "--trials", "2",
                            "--seed", "3", "--ppl-docs", "2", "--ppl-length", "300", "--out", str(out),
                            "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "passkey accuracy (generate)" in printed and "loss keeps falling with more context:" in printed
    result = json.loads((out / "needle.json").read_text())
    assert {"model", "scoring", "scoring_note", "lengths", "depths", "trials", "seed", "accuracy",
            "teacher_forced_accuracy", "overall_accuracy", "cells", "files", "loss_by_position"} <= set(result)
    assert result["scoring"] == "generate" and result["lengths"] == [128, 200] and result["depths"] == [0, 0.5, 1]
    assert np.asarray(result["accuracy"]).shape == (2, 3) and len(result["cells"]) == 6
    for cell in result["cells"]:
        assert len(cell["trials"]) == 2 and 0.0 <= cell["accuracy"] <= 1.0
        for trial in cell["trials"]:
            assert trial["length"] == cell["length"] and len(trial["passkey"]) == 5 and "output" in trial
            assert 0 <= trial["needle_start"] < trial["needle_end"] <= cell["length"]
    record = result["loss_by_position"]
    assert record["documents"] == 2 and len(record["per_position"]) == 299
    assert [b["first"] for b in record["buckets"]] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert all(np.isfinite(b["mean_loss"]) for b in record["buckets"])
    for name in ("needle.json", "needle_accuracy.png", "loss_by_position.png"):
        assert (out / name).stat().st_size > 0, name
    # teacher-forced only (no decoded outputs), the loss table from a shards folder's validation split
    from llmjax.data.shards import write_shards

    tokenizer = load_tokenizer("bytes")
    texts = [FILLER_TEXT[:250], FILLER_TEXT[:400], FILLER_TEXT[:320]]  # the first is too short for --ppl-length 300
    write_shards(texts, tokenizer, tmp_path / "tokens" / "validation", progress=False)
    assert experiment.main(["--ckpt", str(tiny_run), "--lengths", "128", "--depths", "0.25", "--trials", "2",
                            "--scoring", "teacher-forced", "--ppl-docs", "5", "--ppl-length", "300", "--ppl-tokens",
                            str(tmp_path / "tokens"), "--out", str(tmp_path / "forced"), "--no-progress"]) == 0
    forced = json.loads((tmp_path / "forced" / "needle.json").read_text())
    assert forced["scoring"] == "teacher-forced" and "output" not in forced["cells"][0]["trials"][0]
    record = forced["loss_by_position"]
    assert record["documents"] == 2 and record["documents_asked"] == 5
    assert record["source"] == str(tmp_path / "tokens" / "validation")


@pytest.mark.parametrize("flags,message", [
    (["--lengths", "1000"], "--lengths 1000: the prompt and its 6 answer tokens need 1006 positions, more than the "
                            "model's context of 512 (max_seq_len); give lengths of at most 506"),
    (["--lengths", "40"], "--lengths 40: the needle and question alone take 98 tokens"),
    (["--lengths", "128,x"], "--lengths '128,x': expected comma-separated whole numbers"),
    (["--depths", "0,1.5"], "--depths '0,1.5': every depth must be in [0, 1]"),
    (["--trials", "0"], "--trials 0: must be at least 1"),
    (["--ppl-docs", "1", "--ppl-length", "600"], "--ppl-length 600: scores 599 positions, more than the model's "
                                                 "context of 512"),
    (["--filler", "/nonexistent/haystack.txt"], "--filler /nonexistent/haystack.txt: No such file or directory"),
    (["--max-seq-len", "0"], "--max-seq-len 0: needs a RoPE model"),
])
def test_bad_flags_are_one_line(tiny_run, flags, message, capsys):
    assert experiment.main(["--ckpt", str(tiny_run), "--lengths", "128", "--depths", "0.5", "--trials", "1",
                            "--no-progress", "--out", "/tmp/needle_never_written", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0, err


def test_max_seq_len_runs_a_rope_model_past_its_context(tiny_run, tmp_path):
    """--max-seq-len: the 512-token model scored on 600-token prompts (how it does past its trained context)."""
    assert experiment.main(["--ckpt", str(tiny_run), "--lengths", "600", "--depths", "0.5", "--trials", "1",
                            "--scoring", "teacher-forced", "--max-seq-len", "1024", "--out", str(tmp_path / "long"),
                            "--no-progress"]) == 0
    result = json.loads((tmp_path / "long" / "needle.json").read_text())
    assert result["max_seq_len"] == 1024 and result["lengths"] == [600]
