import gc
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


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Drop each test module's compiled programs after it: thousands of XLA CPU executables alive in one
    process exhaust the kernel's limit on memory mappings (vm.max_map_count, 65530 by default), and the
    next compilation aborts the whole run."""
    yield
    jax.clear_caches()
    gc.collect()
