"""llmjax.devices: one line saying why jax is not using the GPU nvidia-smi sees (faked here), None otherwise."""

from pathlib import Path

import pytest

from llmjax import devices

H100_LISTING = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5e1a3f2c-0000-0000-0000-000000000000)"


def put_nvidia_smi_on_path(monkeypatch, folder: Path, output: str, exit_code: int = 0) -> None:
    """PATH holds only `folder`, with an nvidia-smi that prints `output` and exits with `exit_code`."""
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho '{output}'\nexit {exit_code}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(folder))


@pytest.fixture
def h100(monkeypatch, tmp_path):
    """One H100 listed by nvidia-smi, the CUDA plugin installed, JAX_PLATFORMS unset, jax on the GPU."""
    put_nvidia_smi_on_path(monkeypatch, tmp_path / "bin", H100_LISTING)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(devices, "installed_cuda_plugin", lambda: "jax-cuda13-plugin 0.11.2")
    monkeypatch.setattr(devices, "started_jax_backend", lambda: "gpu")


def test_on_this_cpu_machine_there_is_nothing_to_say(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert devices.visible_nvidia_gpus() == 0 and devices.gpu_unused_reason() is None


def test_jax_on_the_gpu_is_nothing_to_say(h100):
    assert devices.visible_nvidia_gpus() == 1 and devices.gpu_unused_reason() is None


def test_a_failing_nvidia_smi_means_no_gpu(monkeypatch, tmp_path):
    """nvidia-smi without a driver exits 9: nothing jax could use, nothing to say."""
    put_nvidia_smi_on_path(monkeypatch, tmp_path / "bin", "NVIDIA-SMI has failed", exit_code=9)
    monkeypatch.setattr(devices, "installed_cuda_plugin", lambda: None)
    assert devices.visible_nvidia_gpus() == 0 and devices.gpu_unused_reason() is None


def test_no_cuda_plugin(h100, monkeypatch):
    monkeypatch.setattr(devices, "installed_cuda_plugin", lambda: None)
    monkeypatch.setattr(devices, "started_jax_backend", lambda: "cpu")
    assert devices.gpu_unused_reason() == (
        "nvidia-smi sees 1 GPU but jax has no CUDA plugin installed: run ./install.sh (it picks the gpu extra) "
        "or pip install 'llmjax[gpu]'")


def test_jax_platforms_cpu_is_named(h100, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(devices, "started_jax_backend", lambda: None)  # not started yet: the variable alone tells
    reason = devices.gpu_unused_reason()
    assert "JAX_PLATFORMS=cpu keeps jax off the GPU" in reason and "jax-cuda13-plugin 0.11.2" in reason
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    monkeypatch.setattr(devices, "started_jax_backend", lambda: "gpu")
    assert devices.gpu_unused_reason() is None


def test_cuda_that_failed_to_start(h100, monkeypatch):
    """The plugin is there and nothing forbids the GPU, but jax started on the CPU (e.g. a driver too old)."""
    monkeypatch.setattr(devices, "started_jax_backend", lambda: "cpu")
    reason = devices.gpu_unused_reason()
    assert reason.startswith("nvidia-smi sees 1 GPU and jax-cuda13-plugin 0.11.2 is installed, but jax runs on cpu: "
                             "CUDA failed to initialize")
    assert "\n" not in reason
    monkeypatch.setattr(devices, "started_jax_backend", lambda: None)  # jax not started: cannot tell yet
    assert devices.gpu_unused_reason() is None


def test_counts_every_gpu_listed(monkeypatch, tmp_path):
    put_nvidia_smi_on_path(monkeypatch, tmp_path / "bin", f"{H100_LISTING}\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: x)")
    monkeypatch.setattr(devices, "installed_cuda_plugin", lambda: None)
    assert devices.gpu_unused_reason().startswith("nvidia-smi sees 2 GPUs but")


def test_a_broken_check_is_silent(h100, monkeypatch):
    def broken():
        raise RuntimeError("metadata unreadable")

    monkeypatch.setattr(devices, "installed_cuda_plugin", broken)
    assert devices.gpu_unused_reason() is None


def test_the_real_probes_answer_on_this_machine():
    """Unfaked: jax is imported by the test session but may not have started a backend; the plugin check reads
    metadata only."""
    assert devices.started_jax_backend() in (None, "cpu", "gpu")
    assert devices.installed_cuda_plugin() is None or devices.installed_cuda_plugin().startswith("jax-cuda1")


def test_experiments_print_the_reason_once_to_stderr(h100, monkeypatch, capsys):
    """python -m experiments NAME: the line before the run, not repeated after it."""
    from llmjax.experiments.__main__ import main

    monkeypatch.setattr(devices, "installed_cuda_plugin", lambda: None)
    assert main(["presets"]) == 0
    err = capsys.readouterr().err
    assert err == ("llmjax: nvidia-smi sees 1 GPU but jax has no CUDA plugin installed: run ./install.sh (it picks "
                   "the gpu extra) or pip install 'llmjax[gpu]'\n")
