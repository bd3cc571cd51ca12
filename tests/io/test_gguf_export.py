"""GGUF export (llmjax.io.gguf_export, `python -m experiments export_gguf`) against our importer, the gguf package's
quantizers, transformers' GGUF loader and llama.cpp.

Tiny LLaMA / GPT-2 models (dims multiples of 32, GGUF's block width) exported in f16 / q8_0 / q4_0 and read back by
load_gguf: the parameters equal gguf's own quantize-then-dequantize of the same float weights, exactly, and so do the
logits; read by transformers: the same logits as our model and the same token ids as our tokenizer; by llama.cpp
itself where llama-cpp-python is installed (the bench extra): the same logits and ids. The real SmolLM2-135M-Instruct
imported, exported as q8_0 and imported again; the command line on a run folder; every refusal, and an interrupted
export leaving no file."""

import dataclasses
import functools
import json
import re
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import regex

from llmjax.config import RopeScaling, get_config
from llmjax.io.gguf import GGUFError, load_gguf, read_gguf, read_metadata
from llmjax.io.gguf_export import (
    model_metadata,
    permute_rows,
    pre_tokenizer_name,
    save_gguf,
    tokenizer_metadata,
)
from llmjax.io.hf import _instances, _unflatten, tensor_mappings
from llmjax.model import forward
from llmjax.model.params import flatten_with_names
from llmjax.model.transformer import model_spec
from llmjax.tokenizer import load_tokenizer
from llmjax.tokenizer.bpe_train import train_bpe_from_counts
from llmjax.tokenizer.gguf import tokenizer_from_gguf
from llmjax.tokenizer.pretokenize import CL100K_PATTERN, GPT2_PATTERN

VOCAB = 320  # the tokenizer's 300 ids, then 20 the model has and the tokenizer never makes
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 13))  # [batch, seq]
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TEXTS = [
    "Hello, world! It's a test: they'll see, DON'T   stop.\n\n  x = 1234 + 0.5",
    "naïve café, Привет мир, 日本語 👍🏽 and\ttabs\r\n",
    "def f(n):\n    return [i ** 2 for i in range(n)]  # squares\n",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>",
]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llama_config(**overrides):
    sizes = {"vocab_size": VOCAB, "d_model": 64, "d_ff": 96, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    return get_config("llama-tiny", **sizes | overrides)


def gpt2_config(**overrides):
    # d_ff = 4 * d_model: transformers' GGUF loader ignores gpt2.feed_forward_length
    sizes = {"vocab_size": VOCAB, "d_model": 64, "d_ff": 256, "num_heads": 4, "head_dim": 16}
    return get_config("gpt2-tiny", **sizes | overrides)


def noisy_params(cfg, seed=0):
    """Random parameters, drawn in NumPy (no compilation): norm scales around one, everything else around zero, all
    different (fresh norms are ones and biases zeros: a mix-up would hide)."""
    rng = np.random.default_rng(seed)
    flat = {name: jnp.asarray((1.0 if name.endswith("scale") else 0.0) + 0.1 * rng.standard_normal(spec.shape),
                              jnp.float32)
            for name, spec in flatten_with_names(model_spec(cfg)).items()}
    return _unflatten(flat)


@functools.partial(jax.jit, static_argnums=2)
def _forward(params, tokens, cfg):
    return forward(params, tokens, cfg)


def logits(params, cfg, tokens=TOKENS) -> np.ndarray:
    return np.asarray(_forward(params, jnp.asarray(tokens), cfg))[..., : cfg.vocab_size]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained here (GPT-2's regex, three special tokens): 300 ids."""
    text = Path(regex.__file__).read_text() + Path(json.__file__).read_text()
    counts = {}
    for piece in regex.findall(GPT2_PATTERN, text):
        counts[piece.encode()] = counts.get(piece.encode(), 0) + 1
    trained = train_bpe_from_counts(counts, 300, SPECIALS, progress=False)
    assert trained.vocab_size == 300
    return trained


@pytest.fixture(scope="module")
def llama():
    cfg = llama_config()
    return noisy_params(cfg), cfg


# --- export -> load_gguf ---------------------------------------------------------------------------

def gguf_reference(params, cfg, path) -> dict:
    """Our parameters as the file should hold them, computed without the exporter: each Hugging Face tensor
    (hf.py's table) through gguf's quantize-then-dequantize in the type the file gives it. The blocks of 32 run
    along a row of the GGUF matrix ([out, in]; GPT-2's Conv1D weights are [in, out] in Hugging Face's layout); the
    q / k row permutation moves whole rows, so it changes no block."""
    types = {name: tensor.qtype for name, tensor in read_gguf(path).tensors.items()}
    family = "gpt2" if cfg.positions == "learned" else "llama"
    flat = {name: np.asarray(x, np.float32) for name, x in flatten_with_names(params).items()}
    expected = {}
    for mapping in tensor_mappings(cfg, family):
        for hf_name, layer in _instances(mapping, cfg):
            w = mapping.to_hf(*(flat[p] if layer is None else flat[p][layer] for p in mapping.ours))
            conv1d = family == "gpt2" and re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", hf_name)
            stored = w.T if conv1d else w
            qtype = types[gguf_name(hf_name, family)]
            stored = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(stored), qtype), qtype)
            for p, value in zip(mapping.ours, mapping.to_ours(stored.T if conv1d else stored)):
                if layer is None:
                    expected[p] = value
                else:
                    expected.setdefault(p, np.zeros(flat[p].shape, np.float32))[layer] = value
    return expected


def as_stored(params, cfg, path):
    """The parameters as the file at `path` stores them (gguf_reference), as a tree for `forward`."""
    return _unflatten({name: jnp.asarray(x) for name, x in gguf_reference(params, cfg, path).items()})


def gguf_name(hf_name: str, family: str) -> str:
    from llmjax.io.gguf import gguf_tensor_name

    return gguf_tensor_name(hf_name, family)


def assert_same_model(cfg, loaded_cfg):
    """The config read back is the exported one, up to its label, vocabulary padding and float32 keys."""
    as_written = dataclasses.replace(cfg, norm_eps=float(np.float32(cfg.norm_eps)), rope_layout="half",
                                     vocab_multiple=loaded_cfg.vocab_multiple, param_dtype=loaded_cfg.param_dtype)
    assert loaded_cfg == as_written


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_round_trip_equals_gguf_quantization(tmp_path, llama, quant):
    params, cfg = llama
    path = tmp_path / f"tiny-{quant}.gguf"
    types = save_gguf(params, cfg, path, quant=quant)
    matrix_type = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[quant]
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == matrix_type
    assert types["output.weight"] == ("Q8_0" if quant == "q4_0" else matrix_type)  # the head in more bits
    assert types["token_embd.weight"] == matrix_type and types["output_norm.weight"] == "F32"
    assert [tensor.type_name for tensor in read_gguf(path).tensors.values()] == list(types.values())

    loaded, loaded_cfg = load_gguf(path)
    assert_same_model(cfg, loaded_cfg)
    expected = gguf_reference(params, cfg, path)
    for name, value in flatten_with_names(loaded).items():
        np.testing.assert_array_equal(vocab_rows(name, value), vocab_rows(name, expected[name]), err_msg=name)
    np.testing.assert_allclose(logits(loaded, loaded_cfg), logits(as_stored(params, cfg, path), cfg), atol=2e-5, rtol=0)
    ours, exported = logits(params, cfg), logits(loaded, loaded_cfg)  # and close to the float model's
    relative_rms = np.sqrt(np.mean((exported - ours) ** 2) / np.mean(ours ** 2))
    assert relative_rms < {"f16": 1e-3, "q8_0": 0.04, "q4_0": 0.5}[quant], relative_rms  # random weights: 4 bits hurt


def test_f16_parameters_are_the_float16_roundings(tmp_path, llama):
    params, cfg = llama
    save_gguf(params, cfg, tmp_path / "tiny.gguf")
    loaded, _ = load_gguf(tmp_path / "tiny.gguf")
    originals = flatten_with_names(params)
    for name, value in flatten_with_names(loaded).items():
        value, original = vocab_rows(name, value), vocab_rows(name, originals[name])
        if "norm" in name:  # F32: exact
            np.testing.assert_array_equal(value, original, err_msg=name)
        else:
            np.testing.assert_array_equal(value, original.astype(np.float16).astype(np.float32), err_msg=name)


def vocab_rows(name: str, x) -> np.ndarray:
    """The parameter without the padding rows / columns beyond the vocabulary (not exported; imported as zeros)."""
    x = np.asarray(x)
    if name == "embed/token":
        return x[:VOCAB]
    return x[:, :VOCAB] if name == "lm_head/kernel" else x


@pytest.mark.parametrize("variant", ["tied_biases_interleaved_llama3", "linear_scaling_wide_heads"])
def test_llama_variants_round_trip(tmp_path, variant):
    """Tied embeddings, q / k / v / o and MLP biases, a model trained with RoPE pairing neighbouring dimensions, Llama
    3.1's RoPE scaling (rope_freqs.weight); linear scaling with head_dim * heads != d_model (key_length)."""
    if variant.startswith("tied"):
        cfg = llama_config(tie_embeddings=True, attention_bias=True, mlp_bias=True, rope_layout="interleaved",
                           rope_scaling=RopeScaling("llama3", factor=8.0, original_max_seq_len=32))
    else:
        cfg = llama_config(head_dim=32, rope_scaling=RopeScaling("linear", factor=2.0), rope_theta=50_000.0)
    params = noisy_params(cfg)
    path = tmp_path / "variant.gguf"
    types = save_gguf(params, cfg, path, quant="f16")
    assert ("output.weight" in types) == (not cfg.tie_embeddings)
    assert ("rope_freqs.weight" in types) == variant.startswith("tied")
    loaded, loaded_cfg = load_gguf(path)
    assert_same_model(cfg, loaded_cfg)
    np.testing.assert_allclose(logits(loaded, loaded_cfg), logits(as_stored(params, cfg, path), cfg), atol=2e-5, rtol=0)
    relative_rms = np.sqrt(np.mean((logits(loaded, loaded_cfg) - logits(params, cfg)) ** 2) /
                           np.mean(logits(params, cfg) ** 2))
    assert relative_rms < 1e-3, relative_rms


def test_gpt2_round_trip(tmp_path):
    cfg = gpt2_config()
    params = noisy_params(cfg)
    types = save_gguf(params, cfg, tmp_path / "gpt2.gguf", quant="q8_0")
    assert types["position_embd.weight"] == "F32" and types["blk.0.attn_qkv.bias"] == "F32"
    assert types["output.weight"] == types["token_embd.weight"] == "Q8_0"  # tied: a copy, as llama.cpp's converter
    loaded, loaded_cfg = load_gguf(tmp_path / "gpt2.gguf")
    assert_same_model(cfg, loaded_cfg)
    expected = gguf_reference(params, cfg, tmp_path / "gpt2.gguf")
    for name, value in flatten_with_names(loaded).items():
        np.testing.assert_array_equal(vocab_rows(name, value), vocab_rows(name, expected[name]), err_msg=name)


def test_rows_that_are_not_whole_blocks_stay_f16(tmp_path):
    cfg = llama_config(d_ff=80)  # ffn_down's rows hold 80 inputs: not a multiple of 32
    types = save_gguf(noisy_params(cfg), cfg, tmp_path / "odd.gguf", quant="q4_0")
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert load_gguf(tmp_path / "odd.gguf")[1].d_ff == 80


def test_permute_rows_is_llama_cpps_and_undone_by_the_importer():
    from llmjax.io.gguf import _unpermute_rows

    w = np.arange(4 * 16 * 3).reshape(4 * 16, 3)  # 4 heads of 16 rows
    permuted = permute_rows(w, 4)
    # convert_hf_to_gguf.py: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(permuted[:4, 0], w[[0, 8, 1, 9], 0])
    np.testing.assert_array_equal(_unpermute_rows(permuted, 4, 16), w)
    np.testing.assert_array_equal(_unpermute_rows(permute_rows(w[:, 0], 4), 4, 16), w[:, 0])  # biases too


# --- export -> transformers ---------------------------------------------------------------------------

def transformers_model(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def transformers_logits(path, tokens=TOKENS):
    import torch

    with torch.no_grad():
        return transformers_model(path)(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """{family: (path, params, cfg)}: an untied LLaMA and a tied GPT-2 exported as f16 with the tokenizer."""
    folder = tmp_path_factory.mktemp("exported")
    files = {}
    for family, cfg in (("llama", llama_config()), ("gpt2", gpt2_config())):
        params = noisy_params(cfg, seed=3)
        path = folder / f"{family}.gguf"
        save_gguf(params, cfg, path, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, quant="f16")
        files[family] = (path, params, cfg)
    return files


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_transformers_computes_our_logits(exported, family):
    path, params, cfg = exported[family]
    theirs = transformers_logits(path)
    np.testing.assert_allclose(theirs, logits(as_stored(params, cfg, path), cfg), atol=2e-5, rtol=0)  # same weights
    np.testing.assert_allclose(theirs, logits(params, cfg), atol=5e-3, rtol=0)  # and float16's rounding


def test_transformers_tied_llama(tmp_path):
    cfg = llama_config(tie_embeddings=True)
    params = noisy_params(cfg)
    save_gguf(params, cfg, tmp_path / "tied.gguf")
    np.testing.assert_allclose(transformers_logits(tmp_path / "tied.gguf"),
                               logits(as_stored(params, cfg, tmp_path / "tied.gguf"), cfg), atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_transformers_tokenizer_encodes_like_ours(exported, tokenizer, family):
    """transformers' GGUF GPT-2 tokenizer ignores token types, so special tokens are plain text there: compared on
    texts without them."""
    from transformers import AutoTokenizer

    path = exported[family][0]
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = TEXTS if family == "llama" else [text for text in TEXTS if "<|" not in text]
    for text in texts:
        assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(text), text


def test_tokenizer_and_chat_template_read_back(exported, tokenizer):
    path = exported["llama"][0]
    metadata = read_metadata(path)
    assert metadata["tokenizer.ggml.pre"] == "gpt-2" and metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert metadata["tokenizer.ggml.tokens"][VOCAB - 1] == f"[PAD{VOCAB - 1}]"  # ids the tokenizer lacks
    assert metadata["tokenizer.ggml.token_type"][297:301] == [3, 3, 3, 5]  # CONTROL specials, then UNUSED filler
    back = tokenizer_from_gguf(path)
    for text in TEXTS:
        assert back.encode(text) == tokenizer.encode(text), text
    endoftext = tokenizer.special_tokens["<|endoftext|>"]  # names no EOS: <|endoftext|> is EOS and BOS (GPT-2's way)
    assert (back.special_ids.eos, back.special_ids.bos, back.special_ids.add_bos) == (endoftext, endoftext, False)


def test_byte_tokenizer_is_bpe_without_merges(tmp_path):
    cfg = llama_config(vocab_size=257)
    save_gguf(noisy_params(cfg), cfg, tmp_path / "bytes.gguf", tokenizer=load_tokenizer("bytes"))
    metadata = read_metadata(tmp_path / "bytes.gguf")
    assert metadata["tokenizer.ggml.merges"] == [] and metadata["tokenizer.ggml.tokens"][32] == "Ġ"
    back = tokenizer_from_gguf(tmp_path / "bytes.gguf")
    for text in TEXTS:
        assert back.encode(text) == load_tokenizer("bytes").encode(text), text


def test_pre_tokenizer_names():
    assert pre_tokenizer_name(GPT2_PATTERN, False) == "gpt-2"
    with pytest.raises(GGUFError, match="llama.cpp has no pre-tokenizer .* with this tokenizer's regex"):
        pre_tokenizer_name(CL100K_PATTERN, False)
    with pytest.raises(GGUFError, match="ignore_merges=True differs from llama.cpp's pre-tokenizers with its regex "
                                        r"\(gpt-2, phi-2"):
        pre_tokenizer_name(GPT2_PATTERN, True)


def test_tokenizer_refusals(tokenizer):
    with pytest.raises(GGUFError, match="the tokenizer has 300 ids but the model's vocabulary only 200"):
        tokenizer_metadata(tokenizer, 200)
    with pytest.raises(GGUFError, match="cannot write a str into a GGUF file"):
        tokenizer_metadata("not a tokenizer", 300)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_llama_cpp_runs_the_export(exported, tokenizer, family, monkeypatch):
    """llama.cpp itself (llama-cpp-python, the bench extra's source build; skipped where it is not installed): our
    logits up to its float16 activations, and our token ids."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import llama_cpp.llama_cpp as low_level

    defaults = low_level.llama_model_default_params

    def without_repacking():  # ggml's AMX repacking dies (SIGILL) in containers that do not grant AMX
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(low_level, "llama_model_default_params", without_repacking)
    path, params, cfg = exported[family]
    model = llama_cpp.Llama(model_path=str(path), n_ctx=cfg.max_seq_len, logits_all=True, verbose=False)
    tokens = TOKENS[0].tolist()
    model.eval(tokens)
    theirs, ours = np.array(model.scores[: len(tokens)]), logits(as_stored(params, cfg, path), cfg, TOKENS[:1])[0]
    assert np.sqrt(np.mean((theirs - ours) ** 2) / np.mean(ours ** 2)) < 5e-3
    for text in TEXTS:
        assert model.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text), text
    assert (model.token_eos(), model.token_bos()) == (tokenizer.eot_id, tokenizer.eot_id)


# --- the real model -----------------------------------------------------------------------------------

def test_smollm2_re_exported_as_q8_0(tmp_path, smollm2, smollm2_path):
    """SmolLM2-135M-Instruct (Q4_1 / Q8_0 in its file), imported, exported as q8_0 and imported again: the same
    config, tokenizer and chat template, and logits close on a chat prompt."""
    params, cfg = smollm2
    metadata = read_metadata(smollm2_path)
    tokenizer = tokenizer_from_gguf(metadata)
    path = tmp_path / "smollm2-q8_0.gguf"
    save_gguf(params, cfg, path, tokenizer=tokenizer, chat_template=metadata["tokenizer.chat_template"],
              quant="q8_0", name=metadata["general.name"])
    exported = read_metadata(path)
    for key in ("general.name", "tokenizer.chat_template", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "llama.rope.freq_base"):
        assert exported[key] == metadata[key], key
    loaded, loaded_cfg = load_gguf(path)
    assert loaded_cfg == cfg
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    back = tokenizer_from_gguf(exported)
    tokens = np.array([back.encode(prompt)])
    assert tokens[0].tolist() == tokenizer.encode(prompt)
    ours, again = logits(params, cfg, tokens), logits(loaded, loaded_cfg, tokens)
    np.testing.assert_array_equal(again.argmax(-1), ours.argmax(-1))
    assert np.abs(again - ours).max() < 0.05 * np.abs(ours).max()  # Q4_1 weights re-quantized to 8 bits


# --- refusals and the file on disk ----------------------------------------------------------------------

@pytest.mark.parametrize("cfg, message", [
    (get_config("llama-moe-tiny"), "cannot export a mixture-of-experts model"),
    (llama_config(sliding_window=16), "sliding_window=16; llama.cpp's llama architecture attends to the whole"),
    (llama_config(attn_logit_softcap=30.0), "attention logit soft-capping"),
    (llama_config(norm="layernorm"), "no Hugging Face layout matches this ModelConfig"),
], ids=["moe", "sliding_window", "softcap", "mixed"])
def test_models_gguf_cannot_express_are_refused(tmp_path, cfg, message):
    with pytest.raises(GGUFError, match=message):
        save_gguf({}, cfg, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_refused(tmp_path, llama):
    params, cfg = llama
    with pytest.raises(GGUFError, match=r"unknown GGUF export type 'q5_k'; choose one of: f16, q8_0, q4_0"):
        save_gguf(params, cfg, tmp_path / "x.gguf", quant="q5_k")
    with pytest.raises(GGUFError, match="the output folder .*nowhere does not exist; create it first"):
        save_gguf(params, cfg, tmp_path / "nowhere" / "x.gguf")
    with pytest.raises(GGUFError, match="is a folder; give the path of the .gguf file"):
        save_gguf(params, cfg, tmp_path)
    with pytest.raises(GGUFError, match=r"the parameters do not fit the config: param 'blocks/attn/\w/kernel' has"):
        save_gguf(noisy_params(llama_config(num_heads=8, num_kv_heads=8, head_dim=8)), cfg, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_export_leaves_the_old_file(tmp_path, llama, monkeypatch):
    from llmjax.io import gguf_export

    params, cfg = llama
    path = tmp_path / "model.gguf"
    path.write_bytes(b"the previous export")
    calls = []

    def interrupted(w, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return gguf.quants.quantize(w, qtype)

    monkeypatch.setattr(gguf_export, "_encoded", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_gguf(params, cfg, path, quant="q8_0")
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"] and path.read_bytes() == b"the previous export"
    monkeypatch.undo()
    save_gguf(params, cfg, path, quant="q8_0")  # replaced once complete
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"] and read_gguf(path).tensors


def test_quantized_parameters_are_dequantized_first(tmp_path, llama):
    """A model imported with its blocks kept quantized (QuantizedMatrix leaves) exports as the values they hold."""
    params, cfg = llama
    save_gguf(params, cfg, tmp_path / "q8_0.gguf", quant="q8_0")
    qparams, qcfg = load_gguf(tmp_path / "q8_0.gguf", quantized=True)
    floats, _ = load_gguf(tmp_path / "q8_0.gguf")
    save_gguf(qparams, qcfg, tmp_path / "f16.gguf")
    again, _ = load_gguf(tmp_path / "f16.gguf")
    np.testing.assert_array_equal(again["blocks"]["mlp"]["up"]["kernel"],
                                  floats["blocks"]["mlp"]["up"]["kernel"].astype(jnp.float16).astype(jnp.float32))


# --- the command line -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer, make_run_folder):
    """(run folder, its params, cfg): a tiny LLaMA with the tokenizer and a chat template."""
    cfg = llama_config()
    params = noisy_params(cfg, seed=5)
    folder = make_run_folder(tmp_path_factory.mktemp("runs") / "tiny-run", cfg, params, tokenizer,
                             chat_template=CHAT_TEMPLATE)
    return folder, params, cfg


def test_command_line_exports_a_run(tmp_path, run, capsys):
    from llmjax.experiments import export_gguf

    folder, params, cfg = run
    out = tmp_path / "model.gguf"
    assert export_gguf.main(["--ckpt", str(folder), "--out", str(out), "--quant", "Q8_0", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(rf"wrote {out} \([\d.]+ MiB\): 2 layers, 21 tensors \(5 F32, 16 Q8_0\), 300 tokens, "
                        r"with a chat template", line), line
    metadata = read_metadata(out)
    assert metadata["general.name"] == "tiny-run" and metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert metadata["tokenizer.ggml.eos_token_id"] == 297  # <|endoftext|>
    loaded, loaded_cfg = load_gguf(out)
    np.testing.assert_allclose(logits(loaded, loaded_cfg), logits(as_stored(params, cfg, out), cfg), atol=2e-5)

    again = tmp_path / "again.gguf"  # an imported model exported again, under another name
    assert export_gguf.main(["--gguf", str(out), "--out", str(again), "--name", "tiny", "--no-progress"]) == 0
    exported = read_metadata(again)
    assert exported["general.name"] == "tiny" and exported["tokenizer.ggml.tokens"] == metadata["tokenizer.ggml.tokens"]
    assert exported["tokenizer.chat_template"] == CHAT_TEMPLATE


CASES = ["quant", "no_run", "no_checkpoints", "no_folder", "out_is_folder", "sliding_window", "no_tokenizer",
         "template_missing"]


@pytest.mark.parametrize("case", CASES)
def test_command_line_bad_input_is_one_line(tmp_path, run, tokenizer, capsys, case):
    from llmjax.experiments import export_gguf

    from llmjax.io.hf import save_hf_checkpoint

    out, empty = tmp_path / "model.gguf", tmp_path / "empty-run"
    flags = {
        "quant": ["--ckpt", run[0], "--quant", "q3"],
        "no_run": ["--ckpt", tmp_path / "elsewhere"],
        "no_checkpoints": ["--ckpt", tmp_path],
        "no_folder": ["--ckpt", run[0], "--out", tmp_path / "missing" / "model.gguf"],
        "out_is_folder": ["--ckpt", run[0], "--out", tmp_path],
        "sliding_window": ["--hf", tmp_path / "mistral", "--tokenizer", run[0] / "tokenizer.json"],
        "no_tokenizer": ["--ckpt", empty],
        "template_missing": ["--ckpt", run[0], "--chat-template", tmp_path / "chat.jinja"],
    }[case]
    expected = {
        "quant": "unknown GGUF export type 'q3'; choose one of: f16, q8_0, q4_0",
        "no_run": f"--ckpt {tmp_path / 'elsewhere'}: no such run folder",
        "no_checkpoints": f"no checkpoints in {tmp_path / 'checkpoints'}: give a run folder written by "
                          f"`python -m experiments train`",
        "no_folder": f"--out {tmp_path / 'missing' / 'model.gguf'}: the folder {tmp_path / 'missing'} does not exist; "
                     f"create it first",
        "out_is_folder": f"--out {tmp_path} is a folder; give the path of the .gguf file to write, e.g. "
                         f"{tmp_path / 'model.gguf'}",
        "sliding_window": "cannot export to GGUF: sliding_window=16; llama.cpp's llama architecture attends to the "
                          "whole context (export a model with sliding_window=None)",
        "no_tokenizer": f"tokenizer {empty / 'tokenizer.json'} does not exist (give our .json, a .model, a .gguf, a "
                        f"GPT-2 / Hugging Face folder, or 'bytes')",
        "template_missing": f"{tmp_path / 'chat.jinja'}: No such file or directory",
    }[case]
    if case == "sliding_window":
        cfg = llama_config(sliding_window=16)
        save_hf_checkpoint(noisy_params(cfg), cfg, tmp_path / "mistral")
    if case == "no_tokenizer":
        (empty / "checkpoints").mkdir(parents=True)
    if "--out" not in flags:
        flags += ["--out", out]
    assert export_gguf.main([str(flag) for flag in [*flags, "--no-progress"]]) == 2
    assert capsys.readouterr().err == f"python -m experiments export_gguf: {expected}\n"
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_rope_scalings_in_metadata():
    """NTK-aware scaling is written as the larger base it amounts to; YaRN is refused in one clear error (llama.cpp's
    YaRN parameters are not mapped) rather than written as plain RoPE."""
    cfg = get_config("llama-tiny", rope_scaling=RopeScaling("ntk", 4.0))
    metadata = model_metadata(cfg, "llama")
    expected_base = cfg.rope_theta * 4.0 ** (cfg.head_dim / (cfg.head_dim - 2))
    assert metadata["llama.rope.freq_base"] == pytest.approx(expected_base)
    assert not any("scaling" in key for key in metadata)
    with pytest.raises(ValueError, match="GGUF export of YaRN"):
        model_metadata(get_config("llama-tiny", rope_scaling=RopeScaling("yarn", 4.0)), "llama")
