"""experiments/bench_cpu_decode: its flags, the ratios and token comparison, a short run on the packaged
SmolLM2-135M-Instruct GGUF file, and (where llama-cpp-python, the bench extra, is installed) llama.cpp's greedy
tokens from our exported f16 file against ours on a run folder."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.experiments import bench_cpu_decode


def test_help_and_bad_flags(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench_cpu_decode.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--gguf", "--model", "--ckpt", "--seed", "--precisions", "--prompt", "--new-tokens", "--repeats",
                 "--variants", "--peers", "--llama-cpp-repack", "--export-dir", "--bandwidth-mib", "--out"):
        assert flag in text
    for argv, message in ((["--variants", "float16"], "unknown variant 'float16'"),
                          (["--peers", "vllm"], "unknown peer 'vllm'"), (["--new-tokens", "1"], "--new-tokens must be"),
                          (["--precisions", "bf16"], "unknown precision 'bf16'"),
                          (["--model", "llama-tiny", "--precisions", "file"], "'file' is the --gguf file's own model"),
                          (["--model", "llama-tiny", "--ckpt", str(tmp_path)], "not allowed with argument"),
                          (["--ckpt", str(tmp_path)], f"--ckpt {tmp_path}: no checkpoints folder"),
                          (["--export-dir", str(tmp_path / "nope")], "no such folder")):
        with pytest.raises(SystemExit):
            bench_cpu_decode.main(argv)
        assert message in capsys.readouterr().err, argv
    assert bench_cpu_decode.main(["--gguf", str(tmp_path / "none.gguf")]) == 2
    assert f"--gguf {tmp_path / 'none.gguf'}: no such file" in capsys.readouterr().err


def test_ratios_and_greedy_comparison_per_precision():
    """Each of our rows is compared with the llama.cpp row of its own precision and with transformers; peers and
    skipped rows get no ratios."""
    row = lambda decode, overall, tokens: {"decode_tokens_per_s": decode, "overall_tokens_per_s": overall,  # noqa: E731
                                           "tokens": tokens}
    results = {"file/quantized": row(60.0, 50.0, [1, 2, 3, 4]), "file/llama-cpp": row(120.0, 100.0, [1, 2, 9, 4]),
               "q8_0/quantized": row(30.0, 20.0, [1, 2, 3, 4]), "q8_0/llama-cpp": {"skipped": "not importable"},
               "f16/float32": row(10.0, 8.0, [5, 6]), "f16/llama-cpp": row(20.0, 16.0, [5, 6]),
               "transformers": row(15.0, 10.0, [1, 2, 3, 4])}
    bench_cpu_decode.compare_with_peers(results)
    assert results["file/quantized"]["vs_llama_cpp"] == {"peer": "file/llama-cpp", "decode_ratio": 0.5,
                                                         "overall_ratio": 0.5, "same_tokens": False,
                                                         "first_difference": 2}
    assert results["file/quantized"]["vs_transformers"] == {"peer": "transformers", "decode_ratio": 4.0,
                                                            "overall_ratio": 5.0, "same_tokens": True,
                                                            "first_difference": None}
    assert "vs_llama_cpp" not in results["q8_0/quantized"] and results["q8_0/quantized"]["vs_transformers"]
    assert results["f16/float32"]["vs_llama_cpp"]["same_tokens"]
    assert results["f16/float32"]["vs_transformers"]["first_difference"] == 0
    for peer in ("file/llama-cpp", "f16/llama-cpp", "transformers"):
        assert not any(key.startswith("vs_") for key in results[peer])
    assert bench_cpu_decode.first_difference([1, 2], [1, 2, 3]) == 2
    assert bench_cpu_decode.ratio_cell(results["file/quantized"], "llama_cpp").split() == ["0.50x", "@2"]


@pytest.mark.slow
@pytest.mark.usefixtures("optimized_xla")
def test_short_run_writes_the_table_and_json(tmp_path, capsys):
    """The quantized variant (the file's int4 / int8 blocks, its int8 head through kernels.cpu_qmatvec, activations
    rounded to int8 as llama.cpp's) and llama.cpp on the same Q4_1 file, when installed, each generate 4 tokens (not
    asserted equal to the float answer: "The" and "L" are 0.1 logits apart here, and int8 activations move the
    logits by about 4%; the XLA-matvec variant, 2 minutes more of CPU here, is tested on toy models in
    tests/quant/test_model.py)."""
    out = tmp_path / "bench.json"
    assert bench_cpu_decode.main(["--prompt", "What is the capital of France?", "--new-tokens", "4", "--repeats", "1",
                                  "--variants", "quantized", "--precisions", "file", "--peers", "llama-cpp",
                                  "--bandwidth-mib", "8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    quantized, theirs = report["results"]["file/quantized"], report["results"]["file/llama-cpp"]
    assert len(quantized["tokens"]) == 4
    assert 50e6 < quantized["weight_bytes_per_token"] < 150e6  # int4 blocks and the int8 head, not float32's 538 MB
    assert quantized["prefill_ms"] > 0 and quantized["decode_tokens_per_s"] > 0 and report["read_bandwidth_gb_s"] > 0
    assert report["files"] == {"file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    if "skipped" not in theirs:
        assert len(theirs["tokens"]) == 4 and theirs["decode_tokens_per_s"] > 0
        assert theirs["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
        versus = quantized["vs_llama_cpp"]
        assert versus["decode_ratio"] > 0 and versus["same_tokens"] == (theirs["tokens"] == quantized["tokens"])
    assert "decode tok/s" in capsys.readouterr().out


@pytest.fixture
def gpt2_run(tmp_path, make_run_folder):
    """A run folder as train / quickstart leave it: a GPT-2 (quickstart's family, tiny) with the byte tokenizer
    and no chat template, random weights large enough that greedy choices are not near-ties."""
    from llmjax.config import get_config
    from llmjax.model import init_params
    from llmjax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("bytes")
    cfg = get_config("gpt2-tiny", vocab_size=tokenizer.vocab_size, d_model=64, d_ff=256, num_heads=4, head_dim=16,
                     max_seq_len=128)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), params)
    return make_run_folder(tmp_path / "run", cfg, params, tokenizer)


@pytest.mark.slow
def test_llama_cpp_greedy_from_our_f16_export_equals_ours(gpt2_run, tmp_path, capsys):
    """The issue's figure on a run folder: our f16 export run by llama.cpp (float32 KV cache) gives our own greedy
    tokens (float32 on the f16 file's weights), the plain prompt (no chat template) the same ids on both sides."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "bench.json"
    assert bench_cpu_decode.main(["--ckpt", str(gpt2_run), "--precisions", "f16", "--peers", "llama-cpp",
                                  "--prompt", "    def", "--new-tokens", "24", "--repeats", "1", "--bandwidth-mib", "8",
                                  "--export-dir", str(tmp_path), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    ours, theirs = report["results"]["f16/float32"], report["results"]["f16/llama-cpp"]
    assert report["prompt_format"] == "plain" and report["files"] == {"f16": "run-f16.gguf"}
    assert len(ours["tokens"]) == 24 and len(set(ours["tokens"])) > 1
    assert theirs["tokens"] == ours["tokens"] and theirs["kv_cache"] == "float32"
    assert ours["vs_llama_cpp"]["same_tokens"] and ours["vs_llama_cpp"]["first_difference"] is None
    assert "from our f16 file equal to ours" in capsys.readouterr().out
    assert np.isfinite(ours["vs_llama_cpp"]["decode_ratio"])


@pytest.mark.slow
def test_preset_exported_as_q8_0_and_f16_runs_in_llama_cpp(tmp_path):
    """--model: a LLaMA preset (random weights, the SmolLM2 file's tokenizer and chat prompt) exported by our
    exporter; llama.cpp runs both files, its f16 greedy tokens are ours, and each of our rows gets its ratio."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "bench.json"
    assert bench_cpu_decode.main(["--model", "llama-tiny", "--peers", "llama-cpp", "--new-tokens", "8", "--repeats",
                                  "1", "--bandwidth-mib", "8", "--export-dir", str(tmp_path), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["files"] == {"q8_0": "llama-tiny-q8_0.gguf", "f16": "llama-tiny-f16.gguf"}
    assert report["prompt_format"] == "chat" and report["prompt_tokens"] > 10
    results = report["results"]
    assert set(results) == {"q8_0/quantized", "q8_0/quantized-matvec-xla", "q8_0/llama-cpp", "f16/float32",
                            "f16/llama-cpp"}
    assert results["f16/llama-cpp"]["tokens"] == results["f16/float32"]["tokens"]
    assert len(results["q8_0/llama-cpp"]["tokens"]) == 8 and results["q8_0/llama-cpp"]["kv_cache"] == "float16"
    assert results["q8_0/quantized"]["vs_llama_cpp"]["decode_ratio"] > 0
