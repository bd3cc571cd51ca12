"""bench_train's PyTorch peer is the same GPT-2 as ours, and the benchmark runs at CI size."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llmjax.experiments import bench_train  # noqa: E402
from llmjax.experiments._torch_gpt import from_config, load_llmjax_params  # noqa: E402
from llmjax.config import get_config  # noqa: E402
from llmjax.model import forward, init_params  # noqa: E402


def test_torch_peer_computes_our_gpt2():
    cfg = get_config("gpt2-tiny", vocab_size=320)  # no padding, so logits compare column for column
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.key(1), p.shape), params)  # nonzero biases
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 17))
    want = np.asarray(forward(params, tokens, cfg))
    model = load_llmjax_params(from_config(cfg), params)
    got = model.logits(torch.from_numpy(tokens)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bench_train_reports_both_sides(tmp_path, capsys):
    assert bench_train.main(["--model", "gpt2-tiny", "--vocab", "301", "--batch", "2", "--seq", "16", "--steps", "1",
                             "--warmup", "1", "--check-steps", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["rows"]) == {"llmjax (JAX)", "PyTorch nanoGPT peer"} and result["speedup"] > 0
    assert result["loss_check"]["max_abs_difference"] < 1e-5  # on CPU "auto" attention is the plain one
    assert "ours / peer:" in capsys.readouterr().out


def test_llama_presets_run_without_the_peer_in_every_precision(tmp_path, capsys):
    assert bench_train.main(["--model", "llama-tiny", "--vocab", "301", "--batch", "2", "--seq", "16", "--steps", "1",
                             "--warmup", "1", "--check-steps", "0", "--precision", "all", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "torch peer skipped: the torch peer is nanoGPT's GPT-2" in out
    assert "fp8 / bf16:" in out and "fp8-delayed / bf16:" in out
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["rows"]) == {"llmjax (JAX)", "llmjax (JAX) fp8", "llmjax (JAX) fp8-delayed"}
    assert result["fp8_vs_bf16"] > 0 and result["fp8-delayed_vs_bf16"] > 0
    assert bench_train.parse_precisions("both") == ("bf16", "fp8")
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--precision", "bf16,fp4"])
    assert "unknown precision 'fp4'" in capsys.readouterr().err
