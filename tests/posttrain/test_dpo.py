"""Preference optimization on the CPU: `preference_loss` equals `dpo_loss` on independently computed log-probs; only
reply tokens count; `experiments dpo` raises held-out preference accuracy on a tiny model without collapsing the
chosen replies, resumes at its checkpoint, leaves a run folder that loads, runs SimPO; bad pairs are one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llmjax.experiments import dpo

from llmjax.config import TrainConfig, get_config
from llmjax.io.models import load_model
from llmjax.model import forward, init_params
from llmjax.posttrain.chat_data import ChatDataError
from llmjax.posttrain.losses import dpo_loss
from llmjax.posttrain.preference import (
    PreferenceObjective,
    jitted_preference_loss,
    pair_from_record,
    pairs_from_task,
    preference_loss,
    read_pairs,
    tokenize_pairs,
    with_reference_logps,
)
from llmjax.posttrain.tasks import TASKS, extract_answer
from llmjax.tokenizer import load_tokenizer
from llmjax.tokenizer.chat import ChatFormat
from llmjax.train.checkpoint import Checkpointer, run_record
from llmjax.train.loop import read_metrics
from llmjax.train.state import init_train_state

PAIRS = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "chosen": "4", "rejected": "5"},
    {"prompt": "Say yes.", "chosen": "Yes.", "rejected": "No."},
    {"prompt": "Colour of the sky?", "chosen": "Blue.", "rejected": "Green."},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run folder of a random llama-tiny with the byte tokenizer (the default "Role: text" template), its context
    long enough for the task prompts in bytes."""
    folder = tmp_path_factory.mktemp("base")
    tokenizer = load_tokenizer("bytes")
    cfg, train_cfg = get_config("llama-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=256), TrainConfig()
    checkpointer = Checkpointer(folder / "checkpoints", async_save=False)
    checkpointer.save(init_train_state(cfg, train_cfg, jax.random.key(0)),
                      record=run_record(cfg, train_cfg, loader_state={"step": 0, "seed": 0}, seed=0))
    checkpointer.close()
    tokenizer.save(folder / "tokenizer.json")
    return folder


def write_pairs(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def tiny():
    tokenizer = load_tokenizer("bytes")
    cfg = get_config("llama-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=256)
    return tokenizer, cfg


def reference_sequence_logps(params, cfg, tokens, reply_start, reply_end):
    """Summed log p of tokens[row, reply_start:reply_end] given what precedes them: a plain forward over the whole
    row, log_softmax in float32, gathered by hand."""
    logits = jax.jit(forward, static_argnames="cfg")(params, jnp.asarray(tokens), cfg)[..., :cfg.vocab_size]
    logps = np.asarray(jax.nn.log_softmax(logits, axis=-1))  # [rows, width, vocab]
    return np.array([sum(logps[row, t - 1, tokens[row, t]] for t in range(reply_start[row], reply_end[row]))
                     for row in range(tokens.shape[0])])


def test_preference_loss_is_dpo_on_independent_log_probs(tmp_path):
    tokenizer, cfg = tiny()
    params = init_params(cfg, jax.random.key(1))
    reference_params = init_params(cfg, jax.random.key(2))
    pairs = read_pairs(write_pairs(tmp_path / "pairs.jsonl", PAIRS * 2))
    # the shapes and settings of the command-line run below: its compiled programs are these
    data = with_reference_logps(tokenize_pairs(pairs, tokenizer, ChatFormat(), seq_len=64), reference_params, cfg,
                                rows_per_call=16)
    batch = data.batch(np.arange(len(data)))
    loss, metrics = jitted_preference_loss(params, batch, cfg=cfg, objective=PreferenceObjective("dpo", beta=0.1))

    # independently: whole rows of prompt + reply, reply spans from the mask
    tokens = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)  # [rows, seq + 1]
    start = np.argmax(batch["loss_mask"] > 0, axis=1) + 1
    end = start + batch["loss_mask"].sum(axis=1).astype(int)
    policy = reference_sequence_logps(params, cfg, tokens, start, end)
    reference = reference_sequence_logps(reference_params, cfg, tokens, start, end)
    np.testing.assert_allclose(batch["reference_logps"], reference, rtol=1e-5, atol=1e-4)
    pairs_count = len(data)
    expected, expected_metrics = dpo_loss(policy[:pairs_count], policy[pairs_count:], reference[:pairs_count],
                                          reference[pairs_count:], beta=0.1)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5, atol=1e-6)
    for key in ("accuracy", "reward_margin", "kl"):
        np.testing.assert_allclose(float(metrics[key]), float(expected_metrics[key]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(metrics["chosen_logps"]), policy[:pairs_count].mean(), rtol=1e-5)

    # RPO: plus nll_weight times the chosen replies' mean token NLL (per reply, then over pairs)
    rpo, rpo_metrics = jitted_preference_loss(params, batch, cfg=cfg,
                                              objective=PreferenceObjective("dpo", beta=0.1, nll_weight=0.5))
    chosen_nll = np.mean(-policy[:pairs_count] / (end - start)[:pairs_count])
    np.testing.assert_allclose(float(rpo_metrics["chosen_nll"]), chosen_nll, rtol=1e-5)
    np.testing.assert_allclose(float(rpo), float(expected) + 0.5 * chosen_nll, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ORPO's loss already has"):
        PreferenceObjective("orpo", nll_weight=0.5)


def test_only_reply_tokens_count(assert_only_masked_targets_matter):
    """Changing every target outside the replies (prompt, template, padding) changes neither loss nor gradient, for
    each loss; changing the reply targets does change them."""
    tokenizer, cfg = tiny()
    params = init_params(cfg, jax.random.key(3))
    pairs = [pair_from_record(record) for record in PAIRS]
    data = with_reference_logps(tokenize_pairs(pairs, tokenizer, ChatFormat(), seq_len=64), params, cfg, rows_per_call=16)
    batch = {k: jnp.asarray(v) for k, v in data.batch(np.arange(len(data))).items()}
    mask = batch["loss_mask"] > 0
    assert 0 < int(mask.sum()) < mask.size and not bool(mask[:, 0].any())

    @jax.jit
    def grads(batch):  # the gradient of each loss, in one program
        return [jax.grad(lambda p: preference_loss(p, batch, cfg, PreferenceObjective(loss))[0])(params)  # noqa: B023
                for loss in ("dpo", "simpo", "orpo")]

    assert_only_masked_targets_matter(grads, batch, mask)


def test_task_pairs_differ_only_in_a_wrong_value():
    task = TASKS["arithmetic"]
    for pair in pairs_from_task(task, 20, seed=1):
        assert pair.chosen != pair.rejected
        assert extract_answer(pair.chosen) != extract_answer(pair.rejected)
        assert pair.rejected.startswith("Answer: ")
    sorted_pairs = pairs_from_task(TASKS["sort"], 5, seed=0)
    assert all(p.chosen != p.rejected for p in sorted_pairs)


def run_flags(base, data, run_dir, *extra):
    return ["--ckpt", str(base), "--data", str(data), "--run-dir", str(run_dir), "--batch", "8", "--seq", "64",
            "--lr", "3e-3", "--warmup", "2", "--val-fraction", "0.25", "--eval-every", "10", "--log-every", "5",
            "--save-every", "10", "--seed", "0", "--no-progress", *extra]


def test_dpo_raises_held_out_accuracy_resumes_and_loads(base, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS * 12)  # 48 pairs, 12 held-out copies
    run_dir = tmp_path / "run"
    flags = run_flags(base, data, run_dir, "--beta", "0.1")
    assert dpo.main([*flags, "--steps", "10"]) == 0
    assert dpo.main([*flags, "--steps", "20"]) == 0  # resumes at step 10
    summary = json.loads(capsys.readouterr().out.splitlines()[-2])
    assert summary["start_step"] == 10 and summary["end_step"] == 20
    validation = [m for m in read_metrics(run_dir) if m["kind"] == "validation"]
    assert [m["step"] for m in validation] == [0, 10, 20]
    first, last = validation[0], validation[-1]
    print(f"held-out accuracy {first['accuracy']:.2f} -> {last['accuracy']:.2f}, chosen log p "
          f"{first['chosen_logps']:.2f} -> {last['chosen_logps']:.2f}, margin {last['reward_margin']:.3f}")
    assert first["accuracy"] <= 0.6 and last["accuracy"] >= 0.9
    assert last["chosen_logps"] > first["chosen_logps"] - 5.0  # the chosen replies did not collapse
    assert (run_dir / "preference.png").is_file() and (run_dir / "loss.png").is_file()
    model = load_model(ckpt=run_dir)  # a run folder like any other
    assert model.cfg.vocab_size == 257 and (run_dir / "tokenizer_config.json").is_file()


def test_simpo_runs(base, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS * 12)
    assert dpo.main([*run_flags(base, data, tmp_path / "simpo", "--loss", "simpo"), "--steps", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-2])
    assert summary["end_step"] == 3 and np.isfinite(summary["train"]["loss"]) and "kl" in summary["validation"]


def test_unknown_task_is_one_line(base, tmp_path, capsys):
    assert dpo.main(["--ckpt", str(base), "--task", "chess", "--run-dir", str(tmp_path / "run")]) == 2
    assert "--task 'chess': expected one of arithmetic" in capsys.readouterr().err


@pytest.mark.parametrize("records, message", [
    ([{"prompt": "hi", "chosen": "same", "rejected": "same"}], "states no preference"),
    ([{"prompt": "hi", "chosen": "yes"}], "missing 'rejected'"),
    ([{"prompt": "hi", "chosen": " ", "rejected": "no"}], "empty reply"),
    (["not json"], "line 1: not valid JSON"),
])
def test_bad_pairs_are_one_line(base, tmp_path, capsys, records, message):
    data = write_pairs(tmp_path / "bad.jsonl", records)
    assert dpo.main(["--ckpt", str(base), "--data", str(data), "--run-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("python -m experiments dpo:") and message in error[0], error
    assert "bad.jsonl, line 1" in error[0]
    with pytest.raises(ChatDataError, match=message):
        read_pairs(data)


def test_evaluation_covers_every_held_out_pair():
    """7 pairs in batches of 3: batches of 3, 3 and 1, each weighted by its size, so the mean is over all 7."""
    import numpy as np

    from llmjax.posttrain.preference import PreferenceData, evaluate

    pairs = 7
    inputs = np.arange(2 * pairs, dtype=np.int32)[:, None]  # row i holds i: pairs 0..6, then their rejected rows
    data = PreferenceData(inputs, inputs, np.ones_like(inputs, np.float32), None, 0)
    seen = []

    def eval_fn(params, batch):
        chosen = batch["inputs"][: len(batch["inputs"]) // 2, 0]
        seen.append(len(chosen))
        return 0.0, {"pair_index": np.mean(chosen)}

    assert evaluate(eval_fn, None, data, batch_pairs=3) == {"pair_index": np.mean(np.arange(pairs))}
    assert seen == [3, 3, 1]
