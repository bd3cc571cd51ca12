"""GGUF import against the gguf package and transformers' GGUF loader.

Dequantizers on random blocks against gguf's reference (bit-equal); our int8 / int4 copies of Q8_0 / Q4_0 / Q4_1 /
Q5_0 / Q5_1 against dequantize-then-matmul (bit-equal); tiny LLaMA / GPT-2 files written here the way llama.cpp's
converter writes them, loaded by us and by transformers; the real SmolLM2-135M-Instruct file tensor by tensor and on
logits; and every kind of bad file."""

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from llmjax.config import RopeScaling
from llmjax.io import (
    GGUFError,
    config_from_gguf,
    dequantize,
    load_gguf,
    quantized_matrix,
    read_gguf,
    read_metadata,
)
from llmjax.io.gguf import BLOCK_LAYOUTS, SUPPORTED_TYPES
from llmjax.io.hf import tensor_mappings
from llmjax.model import forward
from llmjax.quant.formats import QuantizedMatrix
from llmjax.quant.model import (
    linear_weights,
    materialize,
    quantize_params,
    quantized_forward,
)

FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
BLOCK_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
KEPT = {Q.Q8_0: "int8", Q.Q4_0: "int4", Q.Q4_1: "int4", Q.Q5_0: "int8", Q.Q5_1: "int8"}  # load_gguf(quantized=True)
WITH_OFFSETS = (Q.Q4_1, Q.Q5_1)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedMatrix)


def param(params: dict, path: str):
    """The leaf at "blocks/attn/q/kernel" (a QuantizedMatrix stays whole)."""
    for key in path.split("/"):
        params = params[key]
    return params


# --- dequantization ----------------------------------------------------------------------

def random_tensor_bytes(qtype, shape, rng) -> np.ndarray:
    """uint8 [*shape[:-1], row bytes] of a tensor of type qtype: every field of every block random (codes any
    bits, float16 scales and mins finite, of both signs)."""
    if qtype in FLOAT_TYPES:
        if qtype == Q.BF16:
            return rng.integers(0, 2**16, shape, dtype=np.uint16).view(np.uint8)
        values = rng.normal(0, 1, shape).astype(np.float32 if qtype == Q.F32 else np.float16)
        return values.view(np.uint8)
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    layout = BLOCK_LAYOUTS[qtype]
    blocks = np.zeros((*shape[:-1], shape[-1] // block_size), layout)
    for name in layout.names:
        field = blocks[name]
        if field.dtype == np.float16:
            blocks[name] = rng.normal(0, 1, field.shape).astype(np.float16)
        else:
            info = np.iinfo(field.dtype)
            blocks[name] = rng.integers(info.min, info.max, field.shape, dtype=field.dtype, endpoint=True)
    return blocks.view(np.uint8)


def test_block_layouts_have_ggml_sizes():
    for qtype, layout in BLOCK_LAYOUTS.items():
        assert layout.itemsize == gguf.GGML_QUANT_SIZES[qtype][1], qtype.name
    assert set(SUPPORTED_TYPES) == set(FLOAT_TYPES + BLOCK_TYPES)


@pytest.mark.parametrize("qtype", FLOAT_TYPES + BLOCK_TYPES, ids=lambda q: q.name)
def test_dequantize_equals_gguf_reference(qtype):
    """7 rows of 3 blocks (gguf's reference works in groups of 16 rows), and a 3-D tensor."""
    rng = np.random.default_rng(int(qtype))
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    for shape in [(7, 3 * max(block_size, 5)), (2, 3, max(block_size, 4))]:
        raw = random_tensor_bytes(qtype, shape, rng)
        ours = dequantize(raw, qtype, shape)
        assert ours.dtype == np.float32 and ours.shape == shape
        np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))


def test_dequantize_takes_type_names_and_ids():
    raw = random_tensor_bytes(Q.Q4_1, (2, 64), np.random.default_rng(0))
    expected = dequantize(raw, Q.Q4_1, (2, 64))
    np.testing.assert_array_equal(dequantize(raw, "q4_1", (2, 64)), expected)
    np.testing.assert_array_equal(dequantize(raw, int(Q.Q4_1), (2, 64)), expected)


def test_dequantize_unsupported_type_names_it_and_lists_the_supported():
    with pytest.raises(GGUFError, match=r"^unsupported GGUF tensor type IQ2_XXS; supported: F32, F16, BF16, Q8_0, "
                                        r"Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K$"):
        dequantize(np.zeros(66, np.uint8), Q.IQ2_XXS, (256,))
    with pytest.raises(GGUFError, match="unsupported GGUF tensor type type id 99"):
        dequantize(np.zeros(4, np.uint8), 99, (1,))
    with pytest.raises(GGUFError, match=r"Q4_0 data of 36 bytes does not hold a tensor of shape \[3, 32\]"):
        dequantize(np.zeros(36, np.uint8), Q.Q4_0, (3, 32))


@pytest.mark.parametrize("qtype", KEPT, ids=lambda q: q.name)
def test_kept_formats_are_bit_exact(qtype):
    """Our QuantizedMatrix of a GGUF matrix dequantizes to gguf's reference, and x @ it (the XLA reference
    path) equals x @ the reference dequantization, bit for bit."""
    rng = np.random.default_rng(int(qtype))
    out_features, in_features = 40, 96  # 3 groups of 32
    raw = random_tensor_bytes(qtype, (out_features, in_features), rng)
    qm = quantized_matrix(raw, qtype, (out_features, in_features))
    assert (qm.format, qm.group_size, qm.shape, qm.codes.shape[-1]) == (KEPT[qtype], 32, (96, 40), 40)
    assert (qm.offsets is not None) == (qtype in WITH_OFFSETS) and qm.zeros is None
    reference = gguf.quants.dequantize(raw, qtype).T  # [in, out]
    np.testing.assert_array_equal(qm.dequantize(), reference)
    x = jnp.asarray(rng.normal(0, 1, (5, in_features)), jnp.float32)
    np.testing.assert_array_equal(x @ qm, jnp.matmul(x, jnp.asarray(reference), preferred_element_type=jnp.float32))


def test_quantized_matrix_refuses_other_types():
    with pytest.raises(GGUFError, match="quantized_matrix takes a 2-D Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 tensor, "
                                        "not Q4_K"):
        quantized_matrix(np.zeros(288, np.uint8), Q.Q4_K, (2, 256))


# --- tiny files written the way llama.cpp's converter writes them ----------------------------

VOCAB = 97
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 11))  # [batch, seq]


def tiny_llama(**overrides):
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10_000.0)
    torch.manual_seed(0)
    return _noisy(transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings | overrides)))


def tiny_gpt2(**overrides):
    # n_inner 4 * n_embd: transformers' GGUF loader ignores gpt2.feed_forward_length
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=256, n_positions=32,
                                     **overrides)
    torch.manual_seed(0)
    return _noisy(transformers.GPT2LMHeadModel(config))


def _noisy(model):
    """Noise on every parameter (fresh models have unit norms and zero biases), so any mix-up shows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.float().eval()


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: RoPE pairs (i, i + d/2) -> (2i, 2i + 1) per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, arch) -> dict[str, np.ndarray]:
    """{GGUF name: array} as llama.cpp's converter writes a Hugging Face model (names from gguf's own table)."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2,
                                     config.num_hidden_layers)
    tensors = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")) or (hf_name == "lm_head.weight" and arch == "gpt2"):
            continue
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = tensor.numpy()
        if ".q_proj." in hf_name:
            w = llama_cpp_permute(w, config.num_attention_heads)
        if ".k_proj." in hf_name:
            w = llama_cpp_permute(w, config.num_key_value_heads)
        if arch == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            w = w.T  # Conv1D [in, out] -> [out, in]
        module, kind = hf_name.rsplit(".", 1)
        tensors[f"{names.get_name(module)}.{kind}"] = w
    if arch == "gpt2":  # the converter writes GPT-2's tied head as a copy of the embedding
        tensors["output.weight"] = tensors["token_embd.weight"].copy()
    return tensors


def llama_metadata(config) -> dict:
    head_dim = config.hidden_size // config.num_attention_heads
    return {
        "llama.block_count": config.num_hidden_layers, "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size, "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "llama.rope.freq_base": config.rope_parameters["rope_theta"], "llama.rope.dimension_count": head_dim,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"<t{i}>" for i in range(config.vocab_size)],
    }


def gpt2_metadata(config) -> dict:
    return {
        "gpt2.block_count": config.n_layer, "gpt2.context_length": config.n_positions,
        "gpt2.embedding_length": config.n_embd, "gpt2.feed_forward_length": config.n_inner,
        "gpt2.attention.head_count": config.n_head, "gpt2.attention.layer_norm_epsilon": config.layer_norm_epsilon,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"<t{i}>" for i in range(config.vocab_size)],
    }


def write_gguf(path, arch: str, metadata: dict, tensors: dict, types=None):
    """A GGUF file through the gguf package's writer; types: {name: GGML type} (default F32) for 2-D tensors,
    quantized with gguf's own quantizer, or raw bytes (uint8 arrays) given with their type."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, array in tensors.items():
        qtype = (types or {}).get(name, Q.F32)
        if array.dtype == np.uint8:
            writer.add_tensor(name, array, raw_dtype=qtype)
        elif qtype == Q.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_model(path, model, arch: str, qtype=Q.F32, **metadata):
    """The model as llama.cpp's converter would write it, every 2-D tensor in qtype."""
    tensors = gguf_tensors(model, arch)
    base = llama_metadata(model.config) if arch == "llama" else gpt2_metadata(model.config)
    types = {name: qtype for name, w in tensors.items() if w.ndim == 2}
    return write_gguf(path, arch, base | metadata, tensors, types)


def transformers_import(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def assert_params_equal_state_dict(params, cfg, state: dict, family: str):
    """Every tensor of a Hugging Face state dict, converted by hf.py's table, equals our parameter exactly."""
    state = {name: np.asarray(t.detach().float().numpy()) for name, t in state.items()}
    params = dequantized(params)
    for mapping in tensor_mappings(cfg, family):
        for layer in range(cfg.num_layers) if mapping.per_layer else [None]:
            name = mapping.hf_name.format(layer=layer)
            for path, expected in zip(mapping.ours, mapping.to_ours(state[name])):
                got = param(params, path) if layer is None else param(params, path)[layer]
                np.testing.assert_array_equal(np.asarray(got), expected, err_msg=f"{name} -> {path}")


def dequantized(params):
    """Every QuantizedMatrix as the float32 array it stands for (one jitted program: bit-equal to eager)."""
    return jax.jit(lambda p: materialize(p, jnp.float32))(params)


def logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("variant, settings", [
    ("tied", {"tie_word_embeddings": True}), ("untied_biases", {"attention_bias": True, "mlp_bias": True}),
])
def test_llama_file_equals_transformers_import(tmp_path, variant, settings):
    model = tiny_llama(**settings)
    path = write_model(tmp_path / "tiny.gguf", model, "llama")
    params, cfg = load_gguf(path)
    assert cfg.tie_embeddings == (variant == "tied") and cfg.attention_bias == (variant == "untied_biases")
    assert cfg.rope_layout == "half"
    assert_params_equal_state_dict(params, cfg, model.state_dict(), "llama")  # F32: exactly the model's weights
    ours = np.asarray(forward(params, jnp.asarray(TOKENS), cfg))[..., :VOCAB]
    np.testing.assert_allclose(ours, logits(model, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", (Q.F16, Q.BF16, *KEPT), ids=lambda q: q.name)
def test_every_type_imports_like_transformers(tmp_path, qtype):
    """Each tensor of a file in F16 / BF16 / Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 (the types gguf can write) equals
    transformers' import (gguf's dequantizer, its own un-permutation), exactly: as floats and, for the formats kept
    quantized, as QuantizedMatrix."""
    path = write_model(tmp_path / "tiny.gguf", tiny_llama(), "llama", qtype)
    reference = transformers_import(path).state_dict()
    params, cfg = load_gguf(path)
    assert_params_equal_state_dict(params, cfg, reference, "llama")
    qparams, _ = load_gguf(path, quantized=True)
    assert_params_equal_state_dict(qparams, cfg, reference, "llama")
    kernels = {name: param(qparams, name) for name in linear_weights(cfg)}
    assert len(kernels) == 7
    for name, kernel in kernels.items():
        assert is_quantized(kernel) == (qtype in KEPT), name
        if is_quantized(kernel):
            assert (kernel.format, kernel.group_size, kernel.lead_shape) == (KEPT[qtype], 32, (cfg.num_layers,))
    assert not is_quantized(qparams["embed"]["token"])  # the embedding (and tied head) stays float


def test_dtype_casts_the_float_parameters(tmp_path):
    path = write_model(tmp_path / "tiny.gguf", tiny_llama(), "llama", Q.Q4_0)
    params, _ = load_gguf(path)
    qparams, cfg = load_gguf(path, dtype="bfloat16", quantized=True)
    assert cfg.param_dtype == "bfloat16" and cfg.compute_dtype == "float32"
    np.testing.assert_array_equal(qparams["embed"]["token"], params["embed"]["token"].astype(jnp.bfloat16))
    assert qparams["blocks"]["attn_norm"]["scale"].dtype == jnp.bfloat16
    assert param(qparams, "blocks/mlp/up/kernel").scales.dtype == jnp.float16  # as the file stores them


@pytest.mark.parametrize("qtype", KEPT, ids=lambda q: q.name)
def test_quantized_import_is_stacked_like_quantize_params(tmp_path, qtype):
    """The pytree quantize_params makes (arrays, shapes, dtypes, static format / group / shape / in_dims; the
    offsets of Q4_1 / Q5_1 besides), so quantized_forward and the quantized decode paths take it as their own."""
    params, cfg = load_gguf(write_model(tmp_path / "tiny.gguf", tiny_llama(), "llama", qtype))
    ours, _ = load_gguf(tmp_path / "tiny.gguf", quantized=True)
    theirs = jax.eval_shape(lambda p: quantize_params(p, cfg, KEPT[qtype], 32, symmetric=True), params)
    without_offsets = jax.tree.map(lambda x: dataclasses.replace(x, offsets=None) if is_quantized(x) else x, ours,
                                   is_leaf=is_quantized)
    assert jax.tree.structure(without_offsets) == jax.tree.structure(theirs)
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert shapes(without_offsets) == shapes(theirs)
    for name in linear_weights(cfg):
        kernel = param(ours, name)
        assert (kernel.offsets is not None) == (qtype in WITH_OFFSETS), name
        if kernel.offsets is not None:
            assert (kernel.offsets.shape, kernel.offsets.dtype) == (kernel.scales.shape, jnp.float16)


def test_a_linear_whose_layers_differ_in_type_is_dequantized(tmp_path):
    model = tiny_llama()
    tensors = gguf_tensors(model, "llama")
    types = {name: Q.Q4_0 for name, w in tensors.items() if w.ndim == 2} | {"blk.1.ffn_down.weight": Q.Q8_0}
    path = write_gguf(tmp_path / "mixed.gguf", "llama", llama_metadata(model.config), tensors, types)
    qparams, cfg = load_gguf(path, quantized=True)
    assert not is_quantized(qparams["blocks"]["mlp"]["down"]["kernel"])
    assert is_quantized(qparams["blocks"]["mlp"]["up"]["kernel"])
    assert_params_equal_state_dict(qparams, cfg, transformers_import(path).state_dict(), "llama")


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_file_equals_transformers(tmp_path, tied):
    """GPT-2: Conv1D weights stored transposed; the converter writes the tied head as a copy of token_embd, so a
    copy means tied and anything else is an untied head."""
    model = tiny_gpt2()
    tensors = gguf_tensors(model, "gpt2")
    if not tied:
        tensors["output.weight"] = tensors["output.weight"] + 0.01
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", gpt2_metadata(model.config), tensors)
    params, cfg = load_gguf(path)
    assert (cfg.tie_embeddings, cfg.norm, cfg.positions, cfg.max_seq_len) == (tied, "layernorm", "learned", 32)
    assert ("lm_head" in params) != tied
    reference = transformers_import(path)
    ours = np.asarray(forward(params, jnp.asarray(TOKENS), cfg))[..., :VOCAB]
    np.testing.assert_allclose(ours, logits(reference, TOKENS), atol=1e-4, rtol=0)
    if tied:
        np.testing.assert_allclose(ours, logits(model, TOKENS), atol=1e-4, rtol=0)


def test_gpt2_quantized_splits_the_fused_qkv(tmp_path):
    model = tiny_gpt2()
    tensors = gguf_tensors(model, "gpt2")
    types = {name: Q.Q8_0 for name, w in tensors.items() if w.ndim == 2 and name.startswith("blk.")}
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", gpt2_metadata(model.config), tensors, types)
    qparams, cfg = load_gguf(path, quantized=True)
    assert all(is_quantized(param(qparams, name)) for name in linear_weights(cfg))  # q, k, v from rows of attn_qkv
    assert_params_equal_state_dict(qparams, cfg, transformers_import(path).state_dict(), "gpt2")


def llama3_divisors(head_dim, theta, factor=8.0, low=1.0, high=4.0, original=8192) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for Llama 3.1 (transcribed): the divisor of each frequency."""
    divisors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelength = 2 * np.pi / freq
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, np.float32)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """head_dim 16, theta 5e5: wavelengths below, inside and above Llama 3.1's band."""
    model = tiny_llama(rope_theta=500_000.0)
    tensors = gguf_tensors(model, "llama") | {"rope_freqs.weight": llama3_divisors(16, 500_000.0)}
    metadata = llama_metadata(model.config) | {"llama.rope.freq_base": 500_000.0}
    _, cfg = load_gguf(write_gguf(tmp_path / "llama3.gguf", "llama", metadata, tensors))
    assert cfg.rope_scaling == RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_seq_len=8192)
    tensors["rope_freqs.weight"] = llama3_divisors(16, 500_000.0, high=2.0)
    with pytest.raises(GGUFError, match="rope_freqs.weight holds RoPE frequency divisors that are not Llama 3.1's"):
        load_gguf(write_gguf(tmp_path / "other.gguf", "llama", metadata, tensors))


# --- the real model ----------------------------------------------------------------------

def test_read_gguf_equals_the_gguf_reader(smollm2_path, smollm2_transformers):
    """The one-pass header parser gives the gguf package's reader's metadata and tensor table."""
    reader = smollm2_transformers.reader
    assert read_metadata(smollm2_path) == read_metadata(reader)
    file = read_gguf(smollm2_path)
    assert list(file.tensors) == [tensor.name for tensor in reader.tensors]
    for tensor in reader.tensors:
        ours = file.tensors[tensor.name]
        assert ours.shape == tuple(reversed(tensor.shape.tolist())) and ours.qtype == tensor.tensor_type
        np.testing.assert_array_equal(ours.data, np.asarray(tensor.data).reshape(-1).view(np.uint8))


def test_config_of_smollm2(smollm2, smollm2_transformers, smollm2_path):
    _, cfg = smollm2
    sizes = (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size)
    assert sizes == (30, 576, 9, 3, 64, 1536, 49152)
    assert (cfg.norm, cfg.positions, cfg.activation, cfg.rope_layout) == ("rmsnorm", "rope", "swiglu", "half")
    assert cfg.tie_embeddings and not cfg.attention_bias and not cfg.mlp_bias
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len) == (100_000.0, None, 8192)
    assert cfg.norm_eps == pytest.approx(1e-5) and cfg.param_dtype == cfg.compute_dtype == "float32"
    theirs = smollm2_transformers.model.config
    assert (theirs.num_hidden_layers, theirs.hidden_size, theirs.intermediate_size) == (30, 576, 1536)
    assert config_from_gguf(read_metadata(smollm2_path), read_gguf(smollm2_path).tensors) == cfg


def test_every_smollm2_tensor_equals_transformers(smollm2, smollm2_transformers):
    params, cfg = smollm2
    assert_params_equal_state_dict(params, cfg, smollm2_transformers.model.state_dict(), "llama")


@pytest.fixture(scope="module")
def smollm2_logits(smollm2, smollm2_prompt_tokens):
    params, cfg = smollm2
    tokens, _ = smollm2_prompt_tokens
    return np.asarray(forward(params, jnp.asarray(tokens), cfg))[..., : cfg.vocab_size]


def test_smollm2_logits_equal_transformers(smollm2_logits, smollm2_transformers, smollm2_prompt_tokens):
    tokens, lengths = smollm2_prompt_tokens
    theirs = logits(smollm2_transformers.model, tokens)
    for row, length in enumerate(lengths):  # right padding: positions before it are unaffected (causal)
        np.testing.assert_allclose(smollm2_logits[row, :length], theirs[row, :length], atol=1e-3, rtol=0)
        np.testing.assert_array_equal(smollm2_logits[row, :length].argmax(-1), theirs[row, :length].argmax(-1))


def test_smollm2_quantized_keeps_the_q4_1_blocks(smollm2_path, smollm2, smollm2_logits, smollm2_prompt_tokens):
    params, cfg = smollm2
    qparams, qcfg = load_gguf(smollm2_path, quantized=True)
    assert qcfg == cfg
    for name in linear_weights(cfg):
        kernel = param(qparams, name)
        assert is_quantized(kernel) and kernel.format == "int4" and kernel.offsets is not None, name
    assert param_bytes(qparams["blocks"]) < 0.3 * param_bytes(params["blocks"])
    for a, b in zip(jax.tree.leaves(dequantized(qparams["blocks"])), jax.tree.leaves(params["blocks"])):
        np.testing.assert_array_equal(a, b)
    tokens, _ = smollm2_prompt_tokens
    ours = np.asarray(quantized_forward(qparams, jnp.asarray(tokens), cfg))[..., : cfg.vocab_size]
    np.testing.assert_allclose(ours, smollm2_logits, atol=1e-5, rtol=0)


def param_bytes(tree) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


# --- bad files ---------------------------------------------------------------------------

@pytest.fixture
def tiny_file(tmp_path):
    model = tiny_llama()
    return tmp_path, model, gguf_tensors(model, "llama"), llama_metadata(model.config)


def one_line_error(call, match) -> str:
    with pytest.raises(GGUFError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    one_line_error(lambda: load_gguf(path), r"model.safetensors: not a GGUF file \(it starts with b'\\x08")
    one_line_error(lambda: load_gguf(tmp_path / "absent.gguf"), "no such file, and not a packaged model")


def test_truncated_file(tiny_file):
    tmp_path, _, tensors, metadata = tiny_file
    data = write_gguf(tmp_path / "whole.gguf", "llama", metadata, tensors).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    one_line_error(lambda: load_gguf(cut), r"cut.gguf: truncated: tensor 'output.weight' needs bytes up to [\d,]+ but "
                                           r"the file has [\d,]+; download or copy it again")
    cut.write_bytes(data[:200])  # inside the token list
    one_line_error(lambda: read_gguf(cut), "cut.gguf: a damaged or truncated GGUF file: its header cannot be read")


def test_unsupported_architecture(tmp_path):
    tensors = {"token_embd.weight": np.ones((4, 8))}
    path = write_gguf(tmp_path / "mamba.gguf", "mamba", {"mamba.block_count": 2}, tensors)
    one_line_error(lambda: load_gguf(path), r"mamba.gguf: unsupported architecture 'mamba'; supported: llama, gpt2$")


def test_unsupported_quant_type(tiny_file):
    tmp_path, _, tensors, metadata = tiny_file
    tensors["blk.1.ffn_up.weight"] = np.zeros((96, 64 // 32 * 18), np.uint8)  # IQ4_NL: 18 bytes per 32 values
    path = write_gguf(tmp_path / "iq4.gguf", "llama", metadata, tensors, {"blk.1.ffn_up.weight": Q.IQ4_NL})
    message = one_line_error(lambda: load_gguf(path), r"tensor 'blk.1.ffn_up.weight': unsupported GGUF tensor type "
                                                      r"IQ4_NL; supported: F32, F16, BF16, Q8_0")
    assert message.endswith("Q6_K")


def test_vocab_that_disagrees_with_the_embedding(tiny_file):
    tmp_path, _, tensors, metadata = tiny_file
    metadata["tokenizer.ggml.tokens"] = metadata["tokenizer.ggml.tokens"][:-1]
    path = write_gguf(tmp_path / "vocab.gguf", "llama", metadata, tensors)
    one_line_error(lambda: load_gguf(path), r"vocabulary size mismatch: tokenizer.ggml.tokens holds 96, "
                                            r"token_embd.weight has 97 \(tokens / rows\)")


@pytest.mark.parametrize("change, match", [
    ({"llama.rope.dimension_count": 8},
     r"partial rotary embeddings \(llama.rope.dimension_count 8 of head dimension 16\) are not supported"),
    ({"llama.rope.scaling.type": "yarn"}, r"RoPE scaling 'yarn' \(llama.rope.scaling.type\) is not supported"),
    ({"llama.expert_count": 8}, "a mixture-of-experts llama file"),
    ({"llama.context_length": None}, "the GGUF metadata lacks 'llama.context_length'"),
])
def test_unsupported_metadata(tiny_file, change, match):
    tmp_path, _, tensors, metadata = tiny_file
    metadata = {key: value for key, value in (metadata | change).items() if value is not None}
    one_line_error(lambda: load_gguf(write_gguf(tmp_path / "bad.gguf", "llama", metadata, tensors)), match)


def test_missing_and_unexpected_tensors(tiny_file):
    tmp_path, _, tensors, metadata = tiny_file
    missing = {name: w for name, w in tensors.items() if name != "blk.2.ffn_down.weight"}
    path = write_gguf(tmp_path / "missing.gguf", "llama", metadata, missing)
    one_line_error(lambda: load_gguf(path), r"missing 1 tensor\(s\) that its metadata calls for: 'blk.2.ffn_down")
    extra = tensors | {"blk.0.ffn_gate_exps.weight": np.ones((2, 96, 64))}
    path = write_gguf(tmp_path / "extra.gguf", "llama", metadata, extra)
    one_line_error(lambda: load_gguf(path), r"1 tensor\(s\) that a llama model does not have: 'blk.0.ffn_gate_exps")
    misshapen = tensors | {"blk.0.attn_k.weight": np.ones((16, 64))}
    path = write_gguf(tmp_path / "shape.gguf", "llama", metadata, misshapen)
    one_line_error(lambda: load_gguf(path), r"tensor 'blk.0.attn_k.weight' has shape \[16, 64\], expected \[32, 64\]")
