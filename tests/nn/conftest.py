import jax
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def x64():
    """llmjax.nn is checked in float64 against float64 references (NumPy written independently, or torch)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)
