"""`python -m experiments generate`: from a run folder, streamed; beam; regex; speculative; bad input in one line."""

import re

import pytest

from llmjax.experiments import generate as experiment


def test_from_a_run_folder_streams_tokens(tmp_path, capsys):
    """A run folder as the trainer leaves it: tokenizer.json and an orbax checkpoint with its record."""
    import jax

    from llmjax.config import TrainConfig, get_config
    from llmjax.tokenizer import load_tokenizer
    from llmjax.train.checkpoint import Checkpointer, run_record
    from llmjax.train.step import init_train_state

    tokenizer = load_tokenizer("bytes")
    tokenizer.save(tmp_path / "tokenizer.json")
    model_cfg, train_cfg = get_config("gpt2-tiny", vocab_size=tokenizer.vocab_size), TrainConfig()
    checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
    checkpointer.save(init_train_state(model_cfg, train_cfg, jax.random.key(0)),
                      record=run_record(model_cfg, train_cfg, loader_state={"seed": 0}, seed=0))
    checkpointer.close()
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


def test_speculative_with_a_draft_prints_plain_greedy_text_and_acceptance(capsys):
    """--draft-model: greedy speculative output is the plain greedy output; the model as its own draft (same preset,
    same seed: the same weights) accepts every draft token."""
    common = ["--model", "llama-tiny", "--prompt", "def f(", "--prompt", "x", "--max-new-tokens", "12",
              "--strategy", "greedy", "--no-eos"]
    assert experiment.main(common) == 0
    plain = capsys.readouterr().out.strip().splitlines()
    assert experiment.main([*common, "--draft-model", "llama-tiny", "--k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:2] == plain  # 12 tokens a row: the prefill's, then 3 rounds of up to 3 drafts + 1
    assert re.fullmatch(r"\[speculative, k=3: acceptance 1\.000, 3\.00 tokens per target pass, 24 tokens in .*\]",
                        lines[2])
    assert experiment.main([*common, "--draft-model", "gpt2-tiny", "--k", "2"]) == 0  # another model: same text
    assert capsys.readouterr().out.strip().splitlines()[:2] == plain


@pytest.mark.parametrize("flags,message", [
    (["--draft-model", "llama-tiny", "--strategy", "beam"], "does not take --strategy beam"),
    (["--draft-model", "llama-tiny", "--stop", "x", "--repetition-penalty", "1.2"],
     "does not take --stop, --repetition-penalty"),
    (["--draft-model", "llama-tiny", "--draft-hf", "nowhere"], "give one draft, not --draft-hf and --draft-model"),
])
def test_speculative_bad_flags_are_one_line(flags, message):
    with pytest.raises(SystemExit, match=message):
        experiment.main(["--model", "llama-tiny", "--prompt", "x", "--max-new-tokens", "4", *flags])


@pytest.mark.parametrize("flags,message", [
    (["--top-p", "0"], "top_p=0.0: must be in (0, 1]"),
    (["--temperature", "-1"], "temperature=-1.0: must be >= 0"),
    (["--regex", "a[^\\s\\S]"], "unsatisfiable"),
    (["--draft-model", "llama-tiny", "--k", "0"], "k=0: the draft must propose at least one token per round"),
])
def test_bad_input_is_one_line(flags, message, capsys):
    assert experiment.main(["--model", "llama-tiny", "--prompt", "x", "--max-new-tokens", "4", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


def test_bench_decode_runs_at_toy_size(tmp_path, capsys):
    """The GPU benchmark's code path on the CPU (no HF peer), so it does not rot between device runs."""
    import json

    from llmjax.experiments import bench_decode

    out = tmp_path / "bench.json"
    assert bench_decode.main(["--model", "llama-tiny", "--batches", "2", "--contexts", "8", "--steps", "2",
                              "--repeats", "1", "--hf-points", "", "--int8-points", "2x8", "--bandwidth-mib", "8",
                              "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["cache"] for r in rows} == {"bfloat16", "int8"}
    assert all(r["ms_per_step"] > 0 and r["roofline_ms"] > 0 for r in rows)
    assert "| batch | context |" in capsys.readouterr().out


# --- --hf: a local folder or a Hugging Face hub id --------------------------------------------------------------------

def save_tiny_hf_folder(folder):
    """A Hugging Face folder (config.json + model.safetensors + tokenizer.json) of a random llama-tiny."""
    import jax

    from llmjax.config import get_config
    from llmjax.io import save_hf_checkpoint
    from llmjax.model import init_params
    from llmjax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("bytes")
    cfg = get_config("llama-tiny", vocab_size=tokenizer.vocab_size)
    save_hf_checkpoint(init_params(cfg, jax.random.key(0)), cfg, folder)
    return folder


def test_hf_from_a_local_folder_or_a_hub_id(tmp_path, monkeypatch, capsys):
    """--hf FOLDER loads the folder as it is; --hf owner/name loads what huggingface_hub fetched (faked here)."""
    import huggingface_hub

    folder = save_tiny_hf_folder(tmp_path / "tiny")
    flags = ["--tokenizer", "bytes", "--prompt", "ab", "--max-new-tokens", "3", "--strategy", "greedy", "--no-stream"]
    assert experiment.main(["--hf", str(folder), *flags]) == 0
    local = capsys.readouterr().out
    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kwargs: fetched.append((repo_id, kwargs["revision"])) or str(folder))
    assert experiment.main(["--hf", "owner/tiny@main", *flags, "--draft-hf", "owner/tiny"]) == 0
    assert fetched == [("owner/tiny", "main"), ("owner/tiny", None)]
    assert capsys.readouterr().out.splitlines()[0] == local.strip()  # the same weights: the same greedy text


def test_hf_hub_id_offline_is_one_line_without_traceback(tmp_path):
    """The command line as typed, with HF_HUB_OFFLINE=1 and an empty hub cache: exit 2, one line naming the
    local-folder alternative (and no network: huggingface_hub is offline, the cache empty)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
                        "HF_HOME": str(tmp_path)}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-m", "experiments", "generate", "--hf", "HuggingFaceTB/SmolLM2-135M",
                             "--prompt", "x"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    said = [line for line in result.stderr.splitlines() if not line.startswith("llmjax: ")]  # a GPU machine's note
    assert said == ["python -m experiments generate: cannot fetch 'HuggingFaceTB/SmolLM2-135M' from the "
                             "Hugging Face hub (offline: HF_HUB_OFFLINE is set and the model is not in the local hub "
                             "cache); download it elsewhere and pass the local folder: --hf /path/to/folder "
                             "(config.json + *.safetensors)"]


def test_hf_missing_local_folder_is_one_line(tmp_path, capsys):
    assert experiment.main(["--hf", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.startswith(f"python -m experiments generate: no such folder: {tmp_path}/missing (")
