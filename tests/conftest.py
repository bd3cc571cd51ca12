import os

# Sharding tests run on 8 simulated CPU devices; set before JAX initializes its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests run only where JAX sees a GPU."""
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
