"""The README says what the code does: its preset table and its test command are the real ones."""

import os
import re
import subprocess
import sys
from pathlib import Path

from llmjax.experiments.presets import presets_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_preset_table_is_generated_by_code():
    table = re.search(r"<!-- presets:begin -->\n(.*?)\n<!-- presets:end -->", README, re.S).group(1)
    assert table == presets_markdown(), "README preset table is stale: paste `python -m experiments presets`"


def test_ci_runs_the_readme_test_command():
    quickstart = re.search(r"## Quickstart.*?```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(quickstart) == 2, "the quickstart is exactly two commands"
    assert quickstart[1] in (ROOT / ".ci/run").read_text()


def test_experiments_help_lists_experiments():
    out = subprocess.run([sys.executable, "-m", "experiments", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "quickstart" in out and "presets" in out


def test_unknown_experiment_is_one_clear_error():
    result = subprocess.run([sys.executable, "-m", "experiments", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("python -m experiments: unknown experiment 'nope'; choose one of: ")
    assert result.stderr.count("\n") == 1


def test_building_blocks_example_runs(tmp_path):
    """The README's llmjax.nn example, as written (its checkpoint path moved to a temporary folder)."""
    code = re.search(r"## Building blocks.*?```python\n(.*?)```", README, re.S).group(1)
    code = code.replace('"/tmp/llmjax-blocks"', repr(str(tmp_path / "blocks")))
    # The example runs eagerly: ~200 one-op programs whose XLA optimization passes are most of its time (-40%
    # without them); the code, its output and the checks are the same.
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    loss, grad_norm, lr = map(float, result.stdout.split())
    assert 4.0 < loss < 5.3 and grad_norm > 0 and 1e-4 < lr < 1e-3  # log(100) = 4.6 at random init
    assert (tmp_path / "blocks").is_dir()
