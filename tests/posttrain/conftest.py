"""A tiny base model as a run folder (llama-tiny, the byte tokenizer, one checkpoint), for the post-training
experiments' end-to-end tests."""

import jax
import jax.numpy as jnp
import numpy as np
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


def assert_only_masked_targets_matter(grads, batch: dict, mask) -> None:
    """grads(batch) -> a list of gradient trees (one per loss): changing every target outside `mask` (prompt,
    template, padding; byte ids) leaves each bit-identical, and changing the targets inside it changes each."""
    changed = dict(batch, targets=jnp.where(mask, batch["targets"], (batch["targets"] + 7) % 256))
    assert bool((changed["targets"] != batch["targets"]).any())
    jax.tree.map(np.testing.assert_array_equal, grads(batch), grads(changed))
    flipped = dict(batch, targets=jnp.where(mask, (batch["targets"] + 7) % 256, batch["targets"]))
    for original, other in zip(grads(batch), grads(flipped)):
        assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(other)))


@pytest.fixture(name="assert_only_masked_targets_matter")
def assert_only_masked_targets_matter_fixture():
    """The check above, for tests (test files here are not a package, so it comes as a fixture)."""
    return assert_only_masked_targets_matter
