"""experiments/bench_cpu_decode: its flags, and a short run on the packaged SmolLM2-135M-Instruct GGUF file."""

import json

import pytest

from llmjax.experiments import bench_cpu_decode


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_cpu_decode.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--gguf", "--prompt", "--new-tokens", "--repeats", "--variants", "--peers", "--bandwidth-mib", "--out"):
        assert flag in text
    for argv, message in ((["--variants", "float16"], "unknown variant 'float16'"),
                          (["--peers", "vllm"], "unknown peer 'vllm'"), (["--new-tokens", "1"], "--new-tokens must be")):
        with pytest.raises(SystemExit):
            bench_cpu_decode.main(argv)
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_short_run_writes_the_table_and_json(tmp_path, capsys):
    """The quantized variant (int4 / int8 blocks through the CPU matvec, int8 head) answers as the float model does
    (transformers' GGUF import answers "The capital of France is Paris.")."""
    from llmjax.io.gguf import resolve_gguf
    from llmjax.tokenizer.gguf import tokenizer_from_gguf

    out = tmp_path / "bench.json"
    assert bench_cpu_decode.main(["--prompt", "What is the capital of France?", "--new-tokens", "4", "--repeats", "1",
                                  "--variants", "quantized", "--peers", "llama-cpp", "--bandwidth-mib", "8",
                                  "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    quantized = report["results"]["quantized"]
    assert tokenizer_from_gguf(resolve_gguf("smollm2-135m-instruct")).decode(quantized["tokens"]) == "The capital of France"
    assert 50e6 < quantized["weight_bytes_per_token"] < 150e6  # int4 blocks and the int8 head, not float32's 538 MB
    assert quantized["prefill_ms"] > 0 and quantized["decode_tokens_per_s"] > 0 and report["read_bandwidth_gb_s"] > 0
    assert report["results"]["llama-cpp"].get("skipped") or report["results"]["llama-cpp"]["decode_tokens_per_s"] > 0
    assert "decode tok/s" in capsys.readouterr().out
