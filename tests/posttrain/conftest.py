"""A tiny base model as a run folder (llama-tiny, the byte tokenizer, one checkpoint), for the post-training
experiments' end-to-end tests."""

import jax
import pytest

from llmjax.config import TrainConfig, get_config
from llmjax.tokenizer import load_tokenizer
from llmjax.train.checkpoint import Checkpointer, run_record
from llmjax.train.state import init_train_state


@pytest.fixture(scope="session")
def byte_run(tmp_path_factory):
    """A run folder of a random llama-tiny (context 512: room for the tasks' prompts) with the byte tokenizer and the
    default "Role: text" chat template."""
    folder = tmp_path_factory.mktemp("byte_run")
    tokenizer = load_tokenizer("bytes")
    cfg, train_cfg = get_config("llama-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=512), TrainConfig()
    checkpointer = Checkpointer(folder / "checkpoints", async_save=False)
    checkpointer.save(init_train_state(cfg, train_cfg, jax.random.key(0)),
                      record=run_record(cfg, train_cfg, loader_state={"step": 0, "seed": 0}, seed=0))
    checkpointer.close()
    tokenizer.save(folder / "tokenizer.json")
    return folder
