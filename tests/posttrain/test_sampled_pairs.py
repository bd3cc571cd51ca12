"""Preference pairs from a model's own samples: `pairs_from_samples` (right vs wrong replies of each problem) and
`experiments dpo --task T --sample G`, which samples them with the engine, keeps them in the run folder and trains."""

import json

import pytest

from llmjax.posttrain.preference import pairs_from_samples
from llmjax.posttrain.tasks import ArithmeticTask, Problem, RewardError, prompt_messages

TASK = ArithmeticTask()
PROBLEMS = [Problem("What is 2 + 3?", "5"), Problem("What is 7 * 8?", "56"), Problem("What is 9 - 4?", "5")]


def test_a_right_reply_is_chosen_and_a_wrong_one_rejected():
    replies = [["Answer: 5", "Answer: 6", "Answer: 4", "Answer: 5"],   # mixed: one pair
               ["Answer: 56", "56, so Answer: 56"],                    # all right: skipped
               ["I think 6", "Answer: 3"]]                             # all wrong: skipped
    made = pairs_from_samples(TASK, PROBLEMS, replies, seed=0)
    assert (made.problems, made.all_right, made.all_wrong, len(made.pairs)) == (3, 1, 1, 1)
    pair = made.pairs[0]
    assert pair.chosen == "Answer: 5" and pair.rejected in ("Answer: 6", "Answer: 4")
    assert list(pair.prompt) == prompt_messages(PROBLEMS[0], TASK)
    again = pairs_from_samples(TASK, PROBLEMS, replies, seed=0)
    assert again.pairs == made.pairs  # seeded choice among ties


def test_sampled_pairs_bad_input():
    with pytest.raises(ValueError, match="3 problems but 2 lists"):
        pairs_from_samples(TASK, PROBLEMS, [["a"], ["b"]])
    with pytest.raises(RewardError):
        pairs_from_samples(TASK, PROBLEMS[:1], [["x", "y"]], reward_fn=lambda completion, problem, task: "high")


def test_dpo_on_pairs_sampled_from_the_base(byte_run, tmp_path, capsys, monkeypatch):
    """A random tiny base almost never answers right, so the reward is a format-free stand-in: replies whose first
    byte is below 'a' win. The sampled pairs are written to the run folder and read back when the run resumes."""
    from llmjax.experiments import dpo

    from llmjax.posttrain import preference

    def first_byte_low(completion, problem, task):
        return 1.0 if completion[:1] < "a" else 0.0

    original = preference.pairs_from_samples
    monkeypatch.setattr(preference, "pairs_from_samples",
                        lambda *args, **kwargs: original(*args, **{**kwargs, "reward_fn": first_byte_low}))
    run_dir = tmp_path / "run"
    flags = ["--ckpt", str(byte_run), "--task", "arithmetic", "--sample", "4", "--examples", "12", "--max-tokens",
             "6", "--seq", "200", "--batch", "2", "--val-fraction", "0.25", "--run-dir", str(run_dir), "--lr", "1e-4",
             "--eval-every", "1", "--log-every", "1", "--no-progress"]
    assert dpo.main([*flags, "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "4 samples of 12 problems:" in err
    lines = (run_dir / "sampled_pairs.jsonl").read_text().splitlines()
    assert lines and all(set(json.loads(line)) == {"prompt", "chosen", "rejected"} for line in lines)
    assert dpo.main([*flags, "--steps", "2"]) == 0
    assert "the pairs sampled when this run started" in capsys.readouterr().err
    assert dpo.main([*flags[:2], "--task", "arithmetic", "--sample", "1", "--run-dir", str(tmp_path / "x")]) == 2
    assert "--sample 1: a pair needs at least 2 replies" in capsys.readouterr().err


def test_load_model_overrides_the_compute_dtype(byte_run):
    from llmjax.io.models import load_model

    assert load_model(ckpt=byte_run).cfg.compute_dtype == "float32"
    model = load_model(ckpt=byte_run, compute_dtype="bfloat16")
    assert model.cfg.compute_dtype == "bfloat16" and model.cfg.param_dtype == "float32"
