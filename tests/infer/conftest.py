import pathlib
import sysconfig

import jax
import pytest

from llmjax.config import get_config
from llmjax.model import init_params


@pytest.fixture(scope="session")
def bpe():
    """A small byte-level BPE (400 ids, multi-byte tokens, <|endoftext|>) learned from one stdlib file."""
    from llmjax.tokenizer.bpe_train import train_bpe

    text = pathlib.Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()
    return train_bpe([text], 400, progress=False, num_workers=1)


@pytest.fixture(scope="session")
def bpe_model(bpe):
    """(params, cfg) of a random llama-tiny over the BPE's vocabulary."""
    cfg = get_config("llama-tiny", vocab_size=bpe.vocab_size)
    return init_params(cfg, jax.random.key(0)), cfg
