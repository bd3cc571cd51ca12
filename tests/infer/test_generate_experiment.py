"""`python -m experiments generate`: from a run folder, streamed; beam; regex; bad input in one line."""

import re

import numpy as np
import pytest

from experiments import generate as experiment


def test_from_a_run_folder_streams_tokens(tmp_path, capsys):
    from llmjax.config import TrainConfig, get_config
    from llmjax.data.loader import ArrayTokens
    from llmjax.tokenizer import load_tokenizer
    from llmjax.train.loop import RunConfig, train

    tokenizer = load_tokenizer("bytes")
    tokenizer.save(tmp_path / "tokenizer.json")
    data = ArrayTokens(np.frombuffer(b"def f(x):\n    return x\n" * 40, np.uint8).astype(np.uint16))
    run = RunConfig(tmp_path, batch_size=8, seq_len=16, save_every=2, eval_every=100, sample_tokens=0, progress=False)
    train(get_config("gpt2-tiny", vocab_size=tokenizer.vocab_size), TrainConfig(total_steps=2, warmup_steps=0), run, data)
    assert experiment.main(["--ckpt", str(tmp_path), "--prompt", "def", "--max-new-tokens", "6", "--strategy", "greedy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def") and re.search(r"\[(length|eos), \d+ tokens\]", out)


def test_regex_and_beam_from_a_random_preset(capsys):
    assert experiment.main(["--model", "llama-tiny", "--prompt", "n=", "--prompt", "m=", "--regex", "[0-9]{4}",
                            "--max-new-tokens", "8", "--no-eos"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(re.search(r'"output": "[0-9]{4}"', line) for line in lines)
    assert experiment.main(["--model", "llama-tiny", "--prompt", "ab", "--strategy", "beam", "--beams", "4",
                            "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("  beam ") == 4


@pytest.mark.parametrize("flags,message", [
    (["--top-p", "0"], "top_p=0.0: must be in (0, 1]"),
    (["--temperature", "-1"], "temperature=-1.0: must be >= 0"),
    (["--regex", "a[^\\s\\S]"], "unsatisfiable"),
])
def test_bad_input_is_one_line(flags, message, capsys):
    assert experiment.main(["--model", "llama-tiny", "--prompt", "x", "--max-new-tokens", "4", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
