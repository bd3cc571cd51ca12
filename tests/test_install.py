"""install.sh picks the gpu extra where nvidia-smi lists a GPU, and not otherwise (dry runs: nothing is installed)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")

H100_LISTING = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5e1a3f2c-0000-0000-0000-000000000000)"


def fake_nvidia_smi(folder: Path, output: str, exit_code: int) -> Path:
    """A folder holding an `nvidia-smi` that prints `output` and exits with `exit_code`."""
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho '{output}'\nexit {exit_code}\n")
    script.chmod(0o755)
    return folder


def dry_run(path: Path, *args: str) -> dict[str, str]:
    """The `key: value` lines of `bash install.sh --dry-run ARGS` with PATH holding only `path`, plus 'reason'
    (the line saying why the gpu extra was chosen or not)."""
    env = {"PATH": str(path), "PYTHON": sys.executable, "HOME": str(path)}
    result = subprocess.run([BASH, "install.sh", "--dry-run", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fields = dict(line.split(": ", 1) for line in lines[1:] if not line.startswith("install.sh:"))
    return {"reason": lines[0], **fields}


@pytest.fixture
def h100(tmp_path):
    return fake_nvidia_smi(tmp_path / "h100", H100_LISTING, 0)


def test_a_listed_gpu_adds_the_gpu_extra(h100):
    out = dry_run(h100)
    assert out["extras"] == "gpu" and out["pip spec"] == ".[gpu]"
    assert out["reason"] == ("install.sh: nvidia-smi found 1 GPU: installing the CUDA build (gpu extra); "
                             "./install.sh cpu forces CPU")
    assert out["python"].startswith(sys.executable)


@pytest.mark.parametrize("args", [["test,serve"], ["test", "serve"], ["test,serve,gpu"]])
def test_the_users_extras_are_kept_and_gpu_added_once(h100, args):
    assert dry_run(h100, *args)["extras"] == "test,serve,gpu"


@pytest.mark.parametrize("args", [["cpu"], ["cpu,test"], ["test", "cpu"]])
def test_cpu_forces_the_cpu_build(h100, args):
    out = dry_run(h100, *args)
    assert "gpu" not in out["extras"] and out["extras"] == ("" if args == ["cpu"] else "test")
    assert out["reason"] == "install.sh: cpu given: installing the CPU build (no gpu extra)"


def test_a_failing_nvidia_smi_means_cpu(tmp_path):
    """nvidia-smi is there but the driver is not (it exits 9): the CPU build."""
    out = dry_run(fake_nvidia_smi(tmp_path / "broken", "NVIDIA-SMI has failed", 9), "test")
    assert out["extras"] == "test" and out["pip spec"] == ".[test]"
    assert out["reason"].startswith("install.sh: nvidia-smi failed (exit 9")


def test_no_nvidia_smi_means_cpu_as_on_ci(tmp_path):
    """What .ci/run does on a CPU machine: ./install.sh test installs .[test], as it always did."""
    out = dry_run(tmp_path, "test")
    assert out["extras"] == "test" and out["pip spec"] == ".[test]"
    assert out["reason"].startswith("install.sh: no nvidia-smi on PATH: installing the CPU build")
    assert dry_run(tmp_path)["pip spec"] == "."


def test_a_dry_run_creates_no_venv(tmp_path):
    """The dry run reports on the venv it would make without making one (run from a copy without .venv)."""
    shutil.copy(ROOT / "install.sh", tmp_path / "install.sh")
    env = {"PATH": str(tmp_path), "PYTHON": sys.executable, "HOME": str(tmp_path)}
    result = subprocess.run([BASH, "install.sh", "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "venv: would be created" in result.stdout and not (tmp_path / ".venv").exists()


def test_contradictions_and_unknown_flags_are_one_line(h100):
    for args, message in ((["cpu,gpu"], "both cpu and gpu given"), (["--dryrun"], "unknown flag --dryrun")):
        result = subprocess.run([BASH, "install.sh", *args], cwd=ROOT, env={"PATH": str(h100)}, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1
