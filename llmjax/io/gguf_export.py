"""GGUF export: a model trained (or imported) here as one file that llama.cpp, ollama and LM Studio run.

    save_gguf(params, cfg, "model.gguf", tokenizer=tokenizer, chat_template=template, quant="q8_0")

The file is what llama.cpp's own converter (convert_hf_to_gguf.py) writes for the same Hugging Face checkpoint:
the parameters go through llmjax.io.hf's tensor table to Hugging Face tensors, are renamed to GGUF's names
(`llmjax.io.gguf.gguf_tensor_name`), LLaMA's q / k rows are permuted so RoPE pairs neighbouring dimensions
(`permute_rows`, the converter's LlamaModel.permute) and GPT-2's Conv1D weights are transposed to [out, in].

Types, as the converter chooses them (and quantized with the `gguf` package's own quantizers):

    f16    every matrix F16
    q8_0   every matrix Q8_0 (blocks of 32: a float16 scale and 32 int8)
    q4_0   every matrix Q4_0 (a float16 scale and 32 4-bit codes), except the output head (the embedding when
           tied), which stays Q8_0: llama.cpp's llama-quantize keeps it in more bits too (Q6_K, which the gguf
           package cannot write)

Norms, biases and every other 1-D tensor, and GPT-2's position embedding, stay F32; a matrix whose rows are not a
whole number of 32-wide blocks falls back to F16, as in llama.cpp's converter.

The tokenizer goes in as llama.cpp's "gpt2" (byte-level BPE) model: tokens in GPT-2's byte alphabet, token types
(special tokens CONTROL, ids the tokenizer lacks up to the model's vocabulary "[PAD<id>]" UNUSED), merges, the name
of the pre-tokenizer whose regex is the tokenizer's (`llmjax.tokenizer.gguf.PRE_TOKENIZERS`), the BOS / EOS /
unknown / padding ids and the add-BOS / add-EOS rules. A tokenizer that names no EOS or BOS gets its "<|endoftext|>"
as both (GPT-2's convention): llama.cpp would otherwise take id 11.

The file is written under a temporary name in the output folder and renamed into place: an interrupted export
leaves no partial file, and an existing file is replaced only when the new one is complete.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import jax
import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    QuantError,
)
from gguf import quants as gguf_quants

from llmjax.config import ModelConfig
from llmjax.io.gguf import (
    _CONV1D,
    GGUFError,
    _gguf_shape,
    _permuted_heads,
    gguf_tensor_name,
)
from llmjax.io.hf import (
    CheckpointMismatchError,
    _checked_params,
    _instances,
    hf_family,
    tensor_mappings,
)
from llmjax.nn.rope import base_theta, rope_frequencies

Q = GGMLQuantizationType
QUANTS = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}  # --quant -> the type of the matrices
FILE_TYPES = {"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}
HEAD_TYPES = {"q4_0": Q.Q8_0}  # the output head (the embedding when tied) in more bits than the rest
GGML_QUANT_VERSION = 2  # llama.cpp's GGML_QNT_VERSION, written as general.quantization_version
F32_TENSORS = ("position_embd.weight", "rope_freqs.weight")  # matrices the converter keeps in F32


# --- what GGUF can hold ----------------------------------------------------------------------

def gguf_architecture(cfg: ModelConfig) -> str:
    """"llama" or "gpt2": llama.cpp's architecture that computes this config exactly; GGUFError naming what does
    not fit otherwise (MoE, a sliding window, logit soft-capping, a mix of GPT-2 and LLaMA parts)."""
    if cfg.is_moe:
        raise GGUFError(f"cannot export a mixture-of-experts model ({cfg.num_experts} experts) to GGUF: llmjax "
                        f"exports dense LLaMA and GPT-2 models")
    if cfg.attn_logit_softcap is not None:
        raise GGUFError(f"cannot export to GGUF: attention logit soft-capping (attn_logit_softcap="
                        f"{cfg.attn_logit_softcap}) has no key in llama.cpp's llama or gpt2 architectures")
    try:
        family = hf_family(cfg)
    except ValueError as error:
        raise GGUFError(f"cannot export to GGUF: {error}") from None
    if family == "mistral":
        raise GGUFError(f"cannot export to GGUF: sliding_window={cfg.sliding_window}; llama.cpp's llama "
                        f"architecture attends to the whole context (export a model with sliding_window=None)")
    return family


def quant_name(quant: str) -> str:
    """The canonical --quant name ("f16", "q8_0", "q4_0"); GGUFError listing them for anything else."""
    name = str(quant).lower()
    if name not in QUANTS:
        raise GGUFError(f"unknown GGUF export type {quant!r}; choose one of: {', '.join(QUANTS)}")
    return name


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str, *, tied: bool) -> GGMLQuantizationType:
    """The GGUF type a tensor is written in (see the module docstring)."""
    if len(shape) < 2 or gguf_name in F32_TENSORS or not gguf_name.endswith(".weight"):
        return Q.F32
    head = ("output.weight", "token_embd.weight") if tied else ("output.weight",)
    qtype = HEAD_TYPES.get(quant, QUANTS[quant]) if gguf_name in head else QUANTS[quant]
    block_size, _ = GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block_size == 0 else Q.F16  # rows of whole blocks only, as llama.cpp's converter


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: q / k rows [heads * head_dim, ...] from Hugging Face's RoPE pairing
    (i, i + head_dim / 2) to GGUF's (2i, 2i + 1) within each head; weights and biases alike."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- the tensors -------------------------------------------------------------------------------

def _tensor_plan(cfg: ModelConfig, family: str, quant: str) -> list[dict]:
    """[{name, shape (NumPy order), qtype, mapping, layer}] in the converter's order: embeddings, blocks, head."""
    plan = []
    for mapping in tensor_mappings(cfg, family):
        for hf_name, layer in _instances(mapping, cfg):
            plan.append({"name": gguf_tensor_name(hf_name, family), "hf_name": hf_name, "mapping": mapping,
                         "layer": layer, "shape": tuple(_gguf_shape(hf_name, mapping.hf_shape))})
    if family == "gpt2" and cfg.tie_embeddings:  # the converter writes GPT-2's tied head as a copy of the embedding
        embedding = next(entry for entry in plan if entry["name"] == "token_embd.weight")
        plan.append(embedding | {"name": "output.weight"})
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3":
        plan.append({"name": "rope_freqs.weight", "shape": (cfg.head_dim // 2,), "mapping": None, "layer": None})
    for entry in plan:  # a tied GPT-2's two copies alike: importers take equal copies as tied
        entry["qtype"] = tensor_type(entry["name"], entry["shape"], quant, tied=cfg.tie_embeddings)
    order = {"token_embd": 0, "position_embd": 0, "rope_freqs": 0, "blk": 1, "output_norm": 2, "output": 2}

    def position(entry):
        first, *rest = entry["name"].split(".")
        return (order[first], int(rest[0]) if first == "blk" else 0)

    return sorted(plan, key=position)


def _float_tensor(entry: dict, flat: dict, cfg: ModelConfig, family: str) -> np.ndarray:
    """One tensor as GGUF holds it, float32: Hugging Face's by hf.py's table, then q / k permuted, Conv1D
    transposed."""
    if entry["name"] == "rope_freqs.weight":  # Llama 3.1: per-frequency divisors of the plain RoPE frequencies
        divisors = rope_frequencies(cfg.head_dim, cfg.rope_theta) / rope_frequencies(cfg.head_dim, cfg.rope_theta,
                                                                                        cfg.rope_scaling)
        return divisors.astype(np.float32)
    mapping, layer = entry["mapping"], entry["layer"]
    ours = [np.asarray(flat[p] if layer is None else flat[p][mapping.ours_slice(layer)]) for p in mapping.ours]
    w = np.asarray(mapping.to_hf(*(x.astype(np.float32) for x in ours)), np.float32)
    if heads := _permuted_heads(entry["hf_name"], family, cfg):
        w = permute_rows(w, heads)
    return np.ascontiguousarray(w.T if _CONV1D.search(entry["hf_name"]) else w)


def _encoded(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The tensor's bytes in `qtype`: float32 / float16 arrays, or uint8 blocks from gguf's quantizer."""
    try:
        return gguf_quants.quantize(w, qtype)
    except QuantError as error:  # planned shapes are whole blocks: a bug here, not bad input
        raise AssertionError(f"gguf could not quantize a {list(w.shape)} tensor to {qtype.name}: {error}") from None


def _nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block_size * block_bytes


# --- the metadata --------------------------------------------------------------------------------

def model_metadata(cfg: ModelConfig, family: str) -> dict:
    """{GGUF key: value} of the hyper-parameters, as llama.cpp's converter writes them for this family."""
    arch = family
    if family == "gpt2":
        return {f"{arch}.context_length": cfg.max_seq_len, f"{arch}.embedding_length": cfg.d_model,
                f"{arch}.feed_forward_length": cfg.d_ff, f"{arch}.block_count": cfg.num_layers,
                f"{arch}.attention.head_count": cfg.num_heads, f"{arch}.attention.layer_norm_epsilon": cfg.norm_eps,
                f"{arch}.vocab_size": cfg.vocab_size}
    metadata = {
        f"{arch}.context_length": cfg.max_seq_len, f"{arch}.embedding_length": cfg.d_model,
        f"{arch}.feed_forward_length": cfg.d_ff, f"{arch}.block_count": cfg.num_layers,
        f"{arch}.attention.head_count": cfg.num_heads, f"{arch}.attention.head_count_kv": cfg.num_kv_heads,
        f"{arch}.rope.freq_base": base_theta(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling),  # ntk: the larger base
        f"{arch}.attention.layer_norm_rms_epsilon": cfg.norm_eps,
        f"{arch}.rope.dimension_count": cfg.head_dim, f"{arch}.vocab_size": cfg.vocab_size,
    }
    if cfg.head_dim * cfg.num_heads != cfg.d_model:  # llama.cpp assumes d_model / heads otherwise
        metadata |= {f"{arch}.attention.key_length": cfg.head_dim, f"{arch}.attention.value_length": cfg.head_dim}
    scaling = cfg.rope_scaling
    if scaling is not None and scaling.kind == "linear":
        metadata |= {f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": scaling.factor}
    elif scaling is not None and scaling.kind == "yarn":
        raise ValueError("GGUF export of YaRN RoPE scaling is not supported (llama.cpp's YaRN parameters are not "
                         "mapped): export to Hugging Face instead, or extend with --method linear or ntk")
    elif scaling is not None and scaling.kind == "llama3":  # the divisors are the tensor rope_freqs.weight; this key
        # is for importers
        metadata[f"{arch}.rope.scaling.original_context_length"] = scaling.original_max_seq_len
    return metadata


def tokenizer_metadata(tokenizer, vocab_size: int, *, eos_id: int | None = None) -> dict:
    """{GGUF key: value} of a byte-level BPE tokenizer (BPETokenizer, or the byte tokenizer: BPE without merges) for
    a model of vocab_size ids; GGUFError for a tokenizer llama.cpp cannot be told about. eos_id: the id that ends a
    reply, when it is not the tokenizer's own EOS (a chat model's <|im_end|>)."""
    from llmjax.tokenizer.base import SpecialIds
    from llmjax.tokenizer.bpe import BPETokenizer, _to_unicode
    from llmjax.tokenizer.bytes import BYTE_VOCAB, ByteTokenizer
    from llmjax.tokenizer.gguf import TokenType

    if isinstance(tokenizer, BPETokenizer):
        vocab, merges, special_ids = tokenizer.vocab, tokenizer.merges, tokenizer.special_ids
        pattern, ignore_merges = tokenizer.pattern, tokenizer.ignore_merges
    elif isinstance(tokenizer, ByteTokenizer):
        vocab, merges, special_ids = {i: bytes([i]) for i in range(BYTE_VOCAB)}, [], SpecialIds()
        pattern, ignore_merges = None, False
    else:
        raise GGUFError(f"cannot write a {type(tokenizer).__name__} into a GGUF file: llmjax exports byte-level BPE "
                        f"tokenizers (llama.cpp's 'gpt2' tokenizer model)")
    specials = tokenizer.special_tokens
    if tokenizer.vocab_size > vocab_size:
        raise GGUFError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary only {vocab_size}: "
                        f"not this model's tokenizer")
    special_of = {i: text for text, i in specials.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in special_of:
            tokens.append(special_of[i])
            types.append(TokenType.CONTROL)
        elif i in vocab:
            tokens.append(_to_unicode(vocab[i]))
            types.append(TokenType.NORMAL)
        else:  # an id the tokenizer never makes (the model's vocabulary is larger): llama.cpp's converter's filler
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    first = {}
    for i, token in enumerate(tokens):
        if first.setdefault(token, i) != i:
            raise GGUFError(f"tokens {first[token]} and {i} are both {token!r} in GPT-2's byte alphabet; a GGUF "
                            f"vocabulary needs distinct token texts")
    named_eos = eos_id if eos_id is not None else special_ids.eos
    eos = named_eos if named_eos is not None else tokenizer.eot_id
    bos = special_ids.bos if special_ids.bos is not None else tokenizer.eot_id
    if eos is not None and not 0 <= eos < vocab_size:
        raise GGUFError(f"the end-of-text id {eos} is not in the model's vocabulary of {vocab_size} ids")
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre_tokenizer_name(pattern, ignore_merges, has_merges=bool(merges)),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.merges": [f"{_to_unicode(a)} {_to_unicode(b)}" for a, b in merges],
    }
    for key, i in (("bos", bos), ("eos", eos), ("unknown", special_ids.unk), ("padding", special_ids.pad)):
        if i is not None:
            metadata[f"tokenizer.ggml.{key}_token_id"] = int(i)
    metadata["tokenizer.ggml.add_bos_token"] = bool(special_ids.add_bos)
    metadata["tokenizer.ggml.add_eos_token"] = bool(special_ids.add_eos)
    return metadata


def pre_tokenizer_name(pattern: str | None, ignore_merges: bool, *, has_merges: bool = True) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) of the pre-tokenizer with this regex and ignore_merges rule; without
    merges the split does not change the ids and GPT-2's is named. GGUFError when llama.cpp knows none."""
    from llmjax.tokenizer.gguf import PRE_TOKENIZERS

    if not has_merges:
        return "gpt-2"
    for name, pre in PRE_TOKENIZERS.items():
        if pre.pattern == pattern and pre.ignore_merges == ignore_merges:
            return name
    same_regex = [name for name, pre in PRE_TOKENIZERS.items() if pre.pattern == pattern]
    if same_regex:
        raise GGUFError(f"the tokenizer's ignore_merges={ignore_merges} differs from llama.cpp's pre-tokenizers with "
                        f"its regex ({', '.join(same_regex)}); llama.cpp would split words differently")
    raise GGUFError(f"llama.cpp has no pre-tokenizer (tokenizer.ggml.pre) with this tokenizer's regex "
                    f"{pattern[:60]!r}...; it could not split text as this tokenizer does. GGUF export needs one of "
                    f"the regexes of llmjax.tokenizer.gguf.PRE_TOKENIZERS (GPT-2's is the default of "
                    f"`python -m experiments tokenizer`)")


class _Writer(GGUFWriter):
    """gguf's writer, which also writes an empty array (a tokenizer without merges) as its item type and count 0,
    where gguf's refuses; llama.cpp and gguf's reader read it."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


_FLOAT_KEYS = ("layer_norm_epsilon", "layer_norm_rms_epsilon", "freq_base", "scaling.factor")


def _add_metadata(writer: GGUFWriter, metadata: dict) -> None:
    """Each value in the type llama.cpp reads it as: counts and ids uint32, hyper-parameters float32, token
    types int32, flags bool, texts and lists of texts strings."""
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif key.endswith(_FLOAT_KEYS):
            writer.add_float32(key, float(value))
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif key == "tokenizer.ggml.token_type":
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        else:
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)


# --- writing -----------------------------------------------------------------------------------

def save_gguf(params: dict, cfg: ModelConfig, path, *, tokenizer=None, chat_template: str | None = None,
              quant: str = "f16", name: str | None = None, eos_id: int | None = None,
              progress: bool = False) -> dict[str, str]:
    """Write a GGUF file that llama.cpp (and transformers' GGUF loader, and `load_gguf`) runs as this model.

    params: llmjax's parameters for cfg (float of any dtype; QuantizedMatrix leaves are dequantized first).
    tokenizer: a BPETokenizer or the byte tokenizer (None: no vocabulary, tokenizer.ggml.model "none").
    chat_template: Jinja source for tokenizer.chat_template. quant: "f16", "q8_0" or "q4_0" (module docstring).
    name: general.name (default cfg.name). eos_id: the id that ends a reply (tokenizer.ggml.eos_token_id; default:
    the tokenizer's EOS, else its <|endoftext|>). progress: a tqdm bar over the tensors on stderr.
    Returns {GGUF tensor name: type name} in file order. Raises GGUFError for a model, tokenizer or path GGUF
    export cannot take, before anything is written; `path` only ever holds a complete file.
    """
    quant = quant_name(quant)
    family = gguf_architecture(cfg)
    path = Path(path)
    if path.is_dir():
        raise GGUFError(f"{path} is a folder; give the path of the .gguf file to write")
    if not path.parent.is_dir():
        raise GGUFError(f"the output folder {path.parent} does not exist; create it first")
    params = _float_params(params)
    if cfg.rope_layout != "half":  # Hugging Face's layout first; the permutation below makes GGUF's
        from llmjax.model.rope import convert_rope_layout

        _checked(params, cfg)
        params, cfg = convert_rope_layout(params, cfg, "half")
    flat = jax.device_get(_checked(params, cfg))  # NumPy: slicing a layer out is then a view, not a device op
    metadata = {"general.type": "model", "general.name": name or cfg.name,
                "general.file_type": int(FILE_TYPES[quant]), "general.quantization_version": GGML_QUANT_VERSION}
    metadata |= model_metadata(cfg, family)
    if tokenizer is not None:
        metadata |= tokenizer_metadata(tokenizer, cfg.vocab_size, eos_id=eos_id)
    else:
        metadata["tokenizer.ggml.model"] = "none"  # llama.cpp needs the key; "none" is a model without a vocabulary
    if chat_template is not None:
        metadata["tokenizer.chat_template"] = chat_template
    plan = _tensor_plan(cfg, family, quant)

    temporary = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        _write(temporary, family, metadata, plan, flat, cfg, progress, path.name, quant)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return {entry["name"]: entry["qtype"].name for entry in plan}


def _write(file: Path, family: str, metadata: dict, plan: list[dict], flat: dict, cfg: ModelConfig, progress: bool,
           label: str, quant: str) -> None:
    """Header and tensor table first, then the tensors one at a time, each converted and quantized as it is written:
    the file's bytes are never all in memory."""
    from tqdm import tqdm

    writer = _Writer(None, family)
    _add_metadata(writer, metadata)
    for entry in plan:
        writer.add_tensor_info(entry["name"], entry["shape"], np.dtype(np.float32),
                               _nbytes(entry["shape"], entry["qtype"]), raw_dtype=entry["qtype"])
    try:
        writer.write_header_to_file(file)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(plan, desc=f"{label} ({quant})", unit="tensor", disable=not progress, leave=False) as bar:
            for entry in bar:
                writer.write_tensor_data(_encoded(_float_tensor(entry, flat, cfg, family), entry["qtype"]))
    finally:
        writer.close()


def _float_params(params: dict) -> dict:
    """The parameters with every QuantizedMatrix dequantized to float32 (float leaves as they are)."""
    import jax.numpy as jnp

    from llmjax.quant.model import is_quantized, materialize

    if not any(is_quantized(leaf) for leaf in jax.tree.leaves(params, is_leaf=is_quantized)):
        return params
    return jax.tree.map(lambda x: materialize(x, jnp.float32) if is_quantized(x) else x, params, is_leaf=is_quantized)


def _checked(params: dict, cfg: ModelConfig) -> dict:
    try:
        return _checked_params(params, cfg)
    except CheckpointMismatchError as error:
        raise GGUFError(f"the parameters do not fit the config: {error}") from None
