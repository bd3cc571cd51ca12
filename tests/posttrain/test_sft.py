"""Supervised fine-tuning end to end on the CPU: `experiments sft` learns a repeated conversation until the base model
answers with its reply, resumes where it stopped, and leaves a run folder that chats; the loss sees the assistant's
tokens only (changing any other target changes no gradient); bad data is one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llmjax.experiments import sft

from llmjax.config import TrainConfig, get_config
from llmjax.infer.generate import generate
from llmjax.io.models import load_model
from llmjax.model import init_params
from llmjax.posttrain.chat_data import pack_conversations, tokenize_conversations
from llmjax.tokenizer import load_tokenizer
from llmjax.tokenizer.chat import ChatFormat
from llmjax.train.loop import read_metrics
from llmjax.train.step import loss_sums

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}]


@pytest.fixture
def base(byte_run):
    return byte_run


def write_chats(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def test_sft_learns_a_repeated_conversation_resumes_and_chats(base, tmp_path, capsys):
    data = write_chats(tmp_path / "chats.jsonl", [CHAT] * 48)
    run_dir = tmp_path / "run"
    flags = ["--ckpt", str(base), "--data", str(data), "--run-dir", str(run_dir), "--batch", "8", "--seq", "64",
             "--lr", "1e-2", "--warmup", "2", "--val-fraction", "0.25", "--eval-every", "20", "--log-every", "5",
             "--save-every", "20", "--sample-tokens", "8", "--no-progress"]
    assert sft.main([*flags, "--steps", "20"]) == 0
    assert sft.main([*flags, "--steps", "40"]) == 0  # resumes at step 20
    summary = json.loads(capsys.readouterr().out.splitlines()[-2])
    assert summary["start_step"] == 20 and summary["end_step"] == 40
    train_losses = [m["loss"] for m in read_metrics(run_dir) if m.get("split", "train") == "train" and "loss" in m]
    assert train_losses[0] > 1.0 and train_losses[-1] < 0.1, train_losses
    assert summary["val_loss"] < 0.1  # the held-out copies of the same chat
    samples = [m["sample"] for m in read_metrics(run_dir) if "sample" in m]
    assert samples[-1].startswith("System: Be brief.") and "Assistant: Paris." in samples[-1], samples

    model = load_model(ckpt=run_dir)  # the run folder chats as its base did: same tokenizer and template
    prompt = model.chat_format.render(CHAT[:2])
    reply = generate(model.params, model.cfg, [model.tokenizer.encode_prompt(prompt)], max_new_tokens=7).tokens[0]
    assert model.tokenizer.decode(reply).startswith(" Paris.")


def test_only_assistant_targets_carry_gradient():
    """Changing the targets of every non-assistant position (prompt, template, padding) changes no gradient."""
    tokenizer = load_tokenizer("bytes")
    cfg = get_config("llama-tiny", vocab_size=tokenizer.vocab_size)
    params = init_params(cfg, jax.random.key(1))
    second = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    rows = pack_conversations(tokenize_conversations([CHAT, second], tokenizer, ChatFormat()), 64, shuffle=False)
    batch = {k: jnp.asarray(v) for k, v in rows.rows(np.arange(len(rows))).items()}
    assert 0 < float(batch["loss_mask"].sum()) < batch["loss_mask"].size
    grad = jax.grad(lambda p, b: loss_sums(p, b, cfg, TrainConfig())[0])
    changed = dict(batch, targets=jnp.where(batch["loss_mask"] > 0, batch["targets"], (batch["targets"] + 7) % 256))
    assert bool((changed["targets"] != batch["targets"]).any())
    jax.tree.map(np.testing.assert_array_equal, grad(params, batch), grad(params, changed))
    flipped = dict(batch, targets=jnp.where(batch["loss_mask"] > 0, (batch["targets"] + 7) % 256, batch["targets"]))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(grad(params, batch)),
                                                         jax.tree.leaves(grad(params, flipped))))


@pytest.mark.parametrize("lines, message", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant"),
    (["not json"], "line 1"),
])
def test_bad_data_is_one_line(base, tmp_path, capsys, lines, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    assert sft.main(["--ckpt", str(base), "--data", str(data), "--run-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("python -m experiments sft:") and message in error[0], error


def test_unknown_task_is_one_line(base, tmp_path, capsys):
    assert sft.main(["--ckpt", str(base), "--task", "chess", "--run-dir", str(tmp_path / "run")]) == 2
    assert "--task 'chess': expected one of arithmetic" in capsys.readouterr().err
