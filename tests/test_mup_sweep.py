"""mup_sweep: every learning rate trained at once (vmapped) equals llmjax's own train_step at that rate; the quick
run writes the report; bad flags are one line."""

import json

import jax
import numpy as np
import pytest

from llmjax.config import TrainConfig, get_config
from llmjax.experiments import mup_sweep
from llmjax.train.state import init_train_state
from llmjax.train.step import train_step, windows_to_batch


def test_vmapped_rates_equal_train_step_at_each_rate():
    args = mup_sweep.parse_args(["--quick", "--lrs", "0.001,0.004", "--steps", "3", "--average", "1"])
    cfg = mup_sweep.model_at(get_config("llama-tiny"), 16, args, "mup")
    batches, _ = mup_sweep.batch_stream(args, cfg.vocab_size)
    swept = mup_sweep.sweep_losses(cfg, args, batches)  # [rates][steps]
    step = jax.jit(train_step, static_argnames=("model_cfg", "train_cfg"))
    for rate, losses in zip(args.lr_list, swept):
        train_cfg = TrainConfig(lr=rate, warmup_steps=args.warmup, total_steps=args.steps)
        state = init_train_state(cfg, train_cfg, jax.random.key(args.seed))
        expected = []
        for windows in batches:
            state, metrics = step(state, windows_to_batch(windows), model_cfg=cfg, train_cfg=train_cfg)
            expected.append(float(metrics["loss"]))
        np.testing.assert_allclose(losses, expected, rtol=2e-5)
    assert swept[0][-1] != swept[1][-1]  # the rates really differ


def test_quick_sweep_writes_the_report(tmp_path, capsys):
    from llmjax.experiments import tokenize

    (tmp_path / "corpus.py").write_text("def f(x):\n    return x + 1\n" * 300)
    assert tokenize.main(["--tokenizer", "bytes", "--corpus", str(tmp_path / "corpus.py"), "--split", "train",
                          "--out", str(tmp_path / "tokens")]) in (0, None)
    out = tmp_path / "sweep"
    assert mup_sweep.main(["--quick", "--widths", "16", "--steps", "3", "--data", str(tmp_path / "tokens"), "--out",
                           str(out)]) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert set(report["results"]) == {"standard", "mup"} and report["widths"] == [16]
    assert report["data"] == str(tmp_path / "tokens")
    for kind in report["results"].values():
        assert len(kind["16"]["final"]) == 3 and all(np.isfinite(kind["16"]["final"]))
    assert report["summary"]["mup"]["shift_grid_steps"] == 0
    assert (out / "sweep.png").stat().st_size > 0
    assert "grid steps" in capsys.readouterr().out


def test_the_best_rate_and_its_shift_in_grid_steps():
    args = mup_sweep.parse_args(["--lrs", "0.001,0.002,0.004,0.008"])
    results = {"standard": {"256": {"final": [3.0, 2.5, 2.7, float("inf")]},
                            "2048": {"final": [2.4, 2.6, 2.9, float("inf")]}},
               "mup": {"256": {"final": [3.0, 2.5, 2.7, 2.9]}, "2048": {"final": [2.8, 2.2, 2.3, float("inf")]}}}
    summary = mup_sweep.summarize(results, args)
    assert summary["standard"] == {"best_lr": {"256": 0.002, "2048": 0.001}, "shift_grid_steps": 1.0}
    assert summary["mup"]["shift_grid_steps"] == 0.0
    assert mup_sweep.final_losses([[3.0, 2.0, 1.0], [1.0, float("nan"), 0.5]], 2) == [1.5, float("inf")]


@pytest.mark.parametrize("argv, message", [
    (["--widths", "100", "--head-dim", "64"], "multiple of --head-dim"),
    (["--lrs", "0.1,-1"], "learning rates must be positive"),
    (["--parametrizations", "ntk"], "choose from standard, mup"),
    (["--steps", "5", "--average", "9"], "--average=9: at most --steps=5"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        mup_sweep.parse_args(argv)
    assert message in capsys.readouterr().err


def test_key_value_heads_divide_the_query_heads_at_every_width():
    preset = get_config("llama-125m")  # 12 heads, 4 key/value heads: 16 // 3 = 5 would divide nothing
    args = mup_sweep.parse_args(["--widths", "256,512,1024,2048"])
    for width in args.width_list:
        cfg = mup_sweep.model_at(preset, width, args, "standard")
        assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.num_heads // cfg.num_kv_heads >= 3
