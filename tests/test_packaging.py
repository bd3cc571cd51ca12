"""What gets installed: `llmjax` only (kernels/ and experiments/ as llmjax.kernels / llmjax.experiments, no
top-level names of their own), no developer tools, and one import name for each module in every setting."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("llmjax", "kernels", "experiments", "tools", "tests")


def python_files():
    for folder in SOURCES:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_code_imports_kernels_and_experiments_by_their_installed_names():
    """`from kernels.x import y` works only where the checkout's root is on sys.path (and then loads a second copy
    of the module beside llmjax.kernels.x); installed, there is no top-level `kernels` or `experiments`."""
    wrong = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            wrong += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names
                      if name.split(".")[0] in ("kernels", "experiments")]
    assert wrong == [], "import llmjax.kernels... / llmjax.experiments... (kernel to kernel: relative) instead of:\n" + \
        "\n".join(wrong)


def test_help_lists_only_user_facing_experiments():
    from llmjax.experiments.__main__ import available

    modules = {path.stem for path in (ROOT / "experiments").glob("*.py")}
    names = set(available())
    assert names == {name for name in modules if not name.startswith("_")}
    assert not names & {path.stem for path in (ROOT / "tools").glob("*.py")}


def test_an_uninstalled_checkout_finds_llmjax_kernels_and_experiments(tmp_path):
    """As on the GPU machine: only the dependencies installed, `PYTHONPATH=. python3 -m experiments NAME`. The
    editable install's finder is taken away, so llmjax/_source_tree.py alone must map the two names."""
    probe = ("import sys\n"
             "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', '')]\n"
             "import llmjax.kernels.norms, llmjax.experiments.presets\n"
             "print(llmjax.kernels.norms.__file__, llmjax.experiments.presets.__file__)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(ROOT / "kernels" / "norms.py"), str(ROOT / "experiments" / "presets.py")]


@pytest.mark.slow
def test_the_wheel_holds_llmjax_only(tmp_path):
    """Build the wheel from a copy of the sources (the checkout gets no build/ or egg-info) and read its names."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("llmjax", "kernels", "experiments", "tools"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-q", str(source), "-w", str(tmp_path / "wheel")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    assert {name.split("/")[0] for name in names} == {"llmjax", wheel.name.split("-py3")[0] + ".dist-info"}
    for folder, package in (("kernels", "llmjax/kernels"), ("experiments", "llmjax/experiments")):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                assert f"{package}/{path.relative_to(ROOT / folder).as_posix()}" in names, path
    assert not any("tools" in name.split("/") for name in names)
    entry_points = zipfile.ZipFile(wheel).read(wheel.name.split("-py3")[0] + ".dist-info/entry_points.txt").decode()
    assert "llmjax-experiments = llmjax.experiments.__main__:console" in entry_points
