"""`experiments generate --mesh`: weights spread over devices (Megatron over tensor, or FSDP) give the
same greedy text as one device."""

import pytest

from llmjax.experiments import generate as experiment


def greedy(capsys, *flags):
    assert experiment.main(["--model", "llama-tiny", "--prompt", "def f(x):", "--strategy", "greedy",
                            "--max-new-tokens", "8", "--no-stream", *flags]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("mesh", ["tensor=2,data=-1", "fsdp=8"])
def test_sharded_weights_generate_the_same_text(capsys, mesh):
    assert greedy(capsys, "--mesh", mesh) == greedy(capsys)
