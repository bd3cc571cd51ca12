import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def load_tool():
    """name -> the module tools/NAME.py: tools/ is not installed (nor always on sys.path under pytest), so it is
    loaded from the checkout."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"tools.{name}", ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
