"""`sft --lora` and `dpo --lora` on the CPU: only adapters train (the base is untouched, the exported model is the base
plus scale * A @ B on the targeted weights), packed chats are scored exactly as the full SFT scores them (prompt
targets carry no gradient), a resumed run ends where an uninterrupted one does, DPO with zero-initialized adapters
starts at log 2 (policy == reference) and raises held-out preference accuracy; LoRA flags without --lora are one line."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llmjax.experiments import dpo, sft

from llmjax.config import TrainConfig, get_config
from llmjax.io.models import load_model
from llmjax.model import init_params
from llmjax.model.params import flatten_with_names
from llmjax.peft.lora import (
    LoraConfig,
    adapter_names,
    init_adapters,
    load_adapters,
    merge,
)
from llmjax.peft.train import lora_loss_sums
from llmjax.posttrain.chat_data import pack_conversations, tokenize_conversations
from llmjax.posttrain.preference import (
    LOSSES,
    PreferenceObjective,
    jitted_preference_loss,
    pair_from_record,
    preference_loss,
    tokenize_pairs,
    with_reference_logps,
)
from llmjax.tokenizer import load_tokenizer
from llmjax.tokenizer.chat import ChatFormat
from llmjax.train.loop import read_metrics
from llmjax.train.step import loss_sums

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}]
SECOND = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
          {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
PAIRS = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Say yes.", "chosen": "Yes.", "rejected": "No."},
    {"prompt": "Colour of the sky?", "chosen": "Blue.", "rejected": "Green."},
]


def write_lines(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def assert_only_adapted_weights_changed(base_dir, run_dir):
    """The run's exported model is the base with its PEFT adapters merged: every other weight bit-identical."""
    base, tuned = load_model(ckpt=base_dir), load_model(ckpt=run_dir)
    adapters, lora_cfg = load_adapters(run_dir / "adapter", base.params, base.cfg)
    adapted = set(adapter_names(adapters))
    expected = flatten_with_names(merge(base.params, adapters, base.cfg, lora_cfg))
    for name, value in flatten_with_names(tuned.params).items():
        if name in adapted:
            assert not np.array_equal(value, flatten_with_names(base.params)[name]), name
            np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(value, flatten_with_names(base.params)[name], err_msg=name)


def test_lora_scores_packed_chats_as_full_sft_and_prompt_targets_carry_no_gradient():
    tokenizer = load_tokenizer("bytes")
    cfg = get_config("llama-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=256)
    params, train_cfg, lora_cfg = init_params(cfg, jax.random.key(1)), TrainConfig(), LoraConfig(rank=4)
    rows = pack_conversations(tokenize_conversations([CHAT, SECOND], tokenizer, ChatFormat()), 160, shuffle=False)
    batch = {k: jnp.asarray(v) for k, v in rows.rows(np.arange(len(rows))).items()}
    assert int(batch["segment_ids"].max()) == 2  # both chats in one row: the segments keep them apart
    adapters = init_adapters(params, cfg, lora_cfg, jax.random.key(2))
    # B = 0: the adapted model is the base, so its loss is the full path's, masks and segments alike
    full = jax.jit(lambda p, b: loss_sums(p, b, cfg, train_cfg)[1])(params, batch)
    lora = jax.jit(lambda a, p, b: lora_loss_sums(a, p, b, cfg, lora_cfg, train_cfg)[1])(adapters, params, batch)
    np.testing.assert_allclose(float(lora["nll_sum"]), float(full["nll_sum"]), rtol=1e-5)
    assert float(lora["tokens"]) == float(full["tokens"]) == float(batch["loss_mask"].sum())

    adapters = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), x.shape), adapters)  # B != 0
    gradient = jax.jit(jax.grad(lambda a, p, b: lora_loss_sums(a, p, b, cfg, lora_cfg, train_cfg)[0]))

    def grad(adapters, batch):  # the weights as arguments, not constants of the program
        return gradient(adapters, params, batch)
    changed = dict(batch, targets=jnp.where(batch["loss_mask"] > 0, batch["targets"], (batch["targets"] + 7) % 256))
    assert bool((changed["targets"] != batch["targets"]).any())
    jax.tree.map(np.testing.assert_array_equal, grad(adapters, batch), grad(adapters, changed))
    flipped = dict(batch, targets=jnp.where(batch["loss_mask"] > 0, (batch["targets"] + 7) % 256, batch["targets"]))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(grad(adapters, batch)),
                                                         jax.tree.leaves(grad(adapters, flipped))))


def test_lora_preference_losses_start_at_the_reference_and_score_reply_tokens_only(assert_only_masked_targets_matter):
    """Zero-initialized adapters: the policy is the reference (DPO loss log 2, KL 0). With B != 0, for each loss, the
    adapters' gradient ignores every target outside the replies and follows the reply targets."""
    tokenizer = load_tokenizer("bytes")
    cfg = get_config("llama-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=256)
    params, lora_cfg = init_params(cfg, jax.random.key(3)), LoraConfig(rank=4)
    pairs = [pair_from_record(record) for record in PAIRS]
    data = with_reference_logps(tokenize_pairs(pairs, tokenizer, ChatFormat(), seq_len=64), params, cfg, rows_per_call=8)
    batch = {k: jnp.asarray(v) for k, v in data.batch(np.arange(len(data))).items()}
    adapters = init_adapters(params, cfg, lora_cfg, jax.random.key(4))
    loss, metrics = jitted_preference_loss(params, batch, cfg=cfg, objective=PreferenceObjective("dpo"),
                                           adapters=adapters, lora_cfg=lora_cfg)
    np.testing.assert_allclose(float(loss), math.log(2), rtol=1e-6)
    assert abs(float(metrics["kl"])) < 1e-4

    adapters = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(5), x.shape), adapters)

    @jax.jit
    def gradients(params, adapters, batch):  # the adapters' gradient of each loss, in one program
        return [jax.grad(lambda a: preference_loss(params, batch, cfg, PreferenceObjective(loss), a,  # noqa: B023
                                                   lora_cfg)[0])(adapters) for loss in LOSSES]

    def grads(batch):
        return gradients(params, adapters, batch)

    mask = batch["loss_mask"] > 0
    assert_only_masked_targets_matter(grads, batch, mask)


def test_sft_lora_learns_resumes_exactly_and_exports(byte_run, tmp_path, capsys):
    data = write_lines(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 40)
    run_dir = tmp_path / "run"
    flags = ["--ckpt", str(byte_run), "--data", str(data), "--run-dir", str(run_dir), "--batch", "8", "--seq", "64",
             "--lora", "--rank", "4", "--lr", "3e-2", "--warmup", "1", "--val-fraction", "0.2", "--eval-every", "8",
             "--log-every", "2", "--save-every", "4", "--sample-tokens", "0", "--steps", "8", "--no-progress"]
    assert sft.main(flags) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-2])
    assert summary["start_step"] == 0 and summary["end_step"] == 8
    losses = [m["loss"] for m in read_metrics(run_dir) if m["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.3, losses  # a random base's logits are small: the loss can only fall so far
    assert summary["val_loss"] < math.log(256) - 0.3
    assert (run_dir / "loss.png").is_file() and sorted(p.name for p in (run_dir / "lora-checkpoints").iterdir()) == [
        "4", "8"]
    assert_only_adapted_weights_changed(byte_run, run_dir)  # and `generate --ckpt RUN` reads the merged model
    final = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()

    # as if stopped after the checkpoint at step 4: the same command continues there and ends where this run ended
    shutil.rmtree(run_dir / "lora-checkpoints" / "8")
    shutil.rmtree(run_dir / "checkpoints")
    shutil.rmtree(run_dir / "adapter")
    assert sft.main(flags) == 0
    resumed = json.loads(capsys.readouterr().out.splitlines()[-2])
    assert resumed["start_step"] == 4 and resumed["end_step"] == 8
    assert resumed["train_loss"] == summary["train_loss"] and resumed["val_loss"] == summary["val_loss"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == final  # bit for bit


def test_dpo_lora_starts_at_log_2_raises_accuracy_keeps_the_base_and_resumes(byte_run, tmp_path, capsys):
    data = write_lines(tmp_path / "pairs.jsonl", PAIRS * 10)  # 40 pairs, 8 held-out copies
    run_dir = tmp_path / "run"
    flags = ["--ckpt", str(byte_run), "--data", str(data), "--run-dir", str(run_dir), "--batch", "8", "--seq", "64",
             "--lora", "--lr", "1e-2", "--warmup", "1", "--val-fraction", "0.2", "--eval-every", "8", "--log-every",
             "4", "--save-every", "4", "--steps", "8", "--no-progress"]
    assert dpo.main(flags) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-2])
    first, last = summary["initial_validation"], summary["validation"]
    # zero-initialized B: the policy is the reference exactly, so every reward is 0 and the loss log 2
    np.testing.assert_allclose(first["loss"], math.log(2), rtol=1e-6)
    assert abs(first["kl"]) < 1e-4 and abs(first["reward_margin"]) < 1e-5
    print(f"held-out accuracy {first['accuracy']:.2f} -> {last['accuracy']:.2f}, margin {last['reward_margin']:.3f}")
    assert last["accuracy"] >= 0.9 and last["reward_margin"] > 0.05 and last["loss"] < math.log(2) - 0.03
    assert (run_dir / "preference.png").is_file() and summary["end_step"] == 8
    assert_only_adapted_weights_changed(byte_run, run_dir)
    final = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()

    for folder in (run_dir / "lora-checkpoints" / "8", run_dir / "checkpoints", run_dir / "adapter"):
        shutil.rmtree(folder)  # as if stopped after the checkpoint at step 4
    assert dpo.main(flags) == 0
    resumed = json.loads(capsys.readouterr().out.splitlines()[-2])
    assert resumed["start_step"] == 4 and resumed["validation"] == last
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == final


@pytest.mark.parametrize("experiment, flag", [(sft, ["--rank", "4"]), (sft, ["--target", "attn/q"]),
                                              (dpo, ["--alpha", "8", "--dropout", "0"])])
def test_lora_flags_without_lora_are_one_line(byte_run, tmp_path, capsys, experiment, flag):
    data = write_lines(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    assert experiment.main(["--ckpt", str(byte_run), "--data", str(data), "--run-dir", str(tmp_path / "run"),
                            *flag]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"python -m experiments {experiment.__name__.rsplit('.', 1)[1]}:")
    assert flag[0] in error[0] and "add --lora" in error[0], error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("experiment", [sft, dpo])
def test_help_names_the_lora_flags(experiment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiment.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--lora", "--rank", "--alpha", "--dropout", "--target"):
        assert flag in text
    assert "with --lora" in text  # the learning rate's LoRA default
