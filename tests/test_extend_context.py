"""experiments/extend_context at CI size: a tiny llama trained at 64 tokens, extended to 128 with YaRN for a few
steps (the new run's config, losses and checkpoint), the scaling arithmetic, and each bad input's one-line error."""

import json

import numpy as np
import pytest

from llmjax.config import RopeScaling, TrainConfig, get_config
from llmjax.data.shards import TokenShards, write_shards
from llmjax.experiments import extend_context
from llmjax.tokenizer.bytes import ByteTokenizer
from llmjax.train.checkpoint import Checkpointer, run_record
from llmjax.train.loop import RunConfig, read_metrics, train
from llmjax.train.step import init_train_state

TRAINED, TO = 64, 128
BATCH = 8  # a multiple of the 8 simulated CPU devices (tests/conftest.py)


def documents(n: int, seed: int) -> list[str]:
    words = np.random.default_rng(seed).choice(["alpha", "beta", "gamma", "delta", "rope", "scale", "token"], (n, 40))
    return [" ".join(row) for row in words]


def tiny_run(root, data) -> None:
    """A one-block llama-tiny trained 2 steps on `data` at TRAINED tokens into root (a checkpoint at step 2)."""
    run = RunConfig(root, batch_size=BATCH, seq_len=TRAINED, log_every=1, eval_every=100, save_every=100,
                    eval_batches=1, sample_tokens=0, progress=False, async_checkpoints=False)
    cfg = get_config("llama-tiny", num_layers=1, max_seq_len=TRAINED)
    train(cfg, TrainConfig(lr=3e-3, warmup_steps=1, total_steps=2), run, TokenShards(data / "train"))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Byte-level shards: ~20k training tokens, ~3k validation tokens."""
    folder = tmp_path_factory.mktemp("extend") / "tokens"
    for split, count, seed in (("train", 80, 0), ("validation", 12, 1)):
        write_shards(documents(count, seed), ByteTokenizer(), folder / split, tokenizer_source="bytes", progress=False)
    return folder


@pytest.fixture(scope="module")
def llama_run(tokens):
    root = tokens.parent / "llama"
    tiny_run(root, tokens)
    return root


def extend(*flags) -> int:
    return extend_context.main([*map(str, flags), "--no-progress", "--log-every", "1"])


def test_extends_to_twice_the_length_with_yarn(llama_run, tokens, tmp_path):
    out = tmp_path / "extended"
    assert extend("--ckpt", llama_run, "--to", TO, "--data", tokens, "--steps", 3, "--batch", BATCH, "--lr", 1e-3,
                  "--warmup", 1, "--eval-batches", 1, "--out", out) == 0
    config = json.loads((out / "config.json").read_text())
    model = config["model"]
    assert model["max_seq_len"] == TO and config["run"]["seq_len"] == TO
    assert model["rope_scaling"]["kind"] == "yarn"
    assert model["rope_scaling"]["factor"] == TO / TRAINED
    assert model["rope_scaling"]["original_max_seq_len"] == TRAINED
    train_losses = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
    assert len(train_losses) == 3 and np.isfinite(train_losses).all()
    assert (out / "checkpoints" / "3").is_dir() and (out / "loss.png").is_file()
    extension = config["extend_context"]
    assert extension["data"] == str(tokens) and extension["base"] == str(llama_run)
    for key in ("val_loss_before_unchanged", "val_loss_before_scaled", "val_loss_after"):
        assert np.isfinite(extension[key]), key
    assert json.loads((out / "extend_context.json").read_text()) == extension


def test_scaling_arithmetic_and_recorded_data():
    cfg = get_config("llama-tiny")
    extended, original = extend_context.extended_config(cfg, 256, "ntk")
    assert (extended.max_seq_len, original) == (256, 64) and extended.rope_scaling == RopeScaling(
        "ntk", 4.0, original_max_seq_len=64)
    again, original = extend_context.extended_config(extended, 1024, "ntk")  # factors do not compound
    assert again.rope_scaling.factor == 16.0 and original == 64 and again.max_seq_len == 1024
    with pytest.raises(extend_context.ExtendError, match="--method yarn: the run already uses RoPE scaling 'ntk'"):
        extend_context.extended_config(extended, 1024, "yarn")
    assert extend_context.recorded_data({"run": {"data": "tok"}}) == "tok"
    assert extend_context.recorded_data({"extend_context": {"data": "tok2"}}) == "tok2"
    assert extend_context.recorded_data({"run": {"seq_len": 64}}) is None


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_input_is_one_clear_error(llama_run, tokens, tmp_path, capsys):
    prog = "python -m experiments extend_context"
    assert extend("--ckpt", llama_run, "--to", TRAINED, "--data", tokens, "--out", tmp_path / "a") == 2
    assert last_error(capsys) == (f"{prog}: --to {TRAINED}: must be greater than the length the run was trained for, "
                                  f"max_seq_len={TRAINED}")
    (tmp_path / "empty").mkdir()
    assert extend("--ckpt", tmp_path / "empty", "--to", TO, "--data", tokens) == 2
    assert last_error(capsys).startswith(f"{prog}: --ckpt {tmp_path / 'empty'}: no checkpoint in ")
    assert extend("--ckpt", tmp_path / "missing", "--to", TO, "--data", tokens) == 2
    assert last_error(capsys) == f"{prog}: --ckpt {tmp_path / 'missing'}: no such run folder"
    assert extend("--ckpt", llama_run, "--to", TO, "--out", tmp_path / "b") == 2
    assert last_error(capsys).startswith(f"{prog}: --data: {llama_run}/config.json does not record the token shards")
    assert extend("--ckpt", llama_run, "--to", TO, "--data", tmp_path, "--out", tmp_path / "c") == 2
    assert last_error(capsys).startswith(f"{prog}: --data {tmp_path}: no token shards")
    assert extend("--ckpt", llama_run, "--to", TO, "--data", tokens, "--steps", 0) == 2
    assert last_error(capsys) == f"{prog}: --steps 0: must be a positive integer"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_learned_positions_are_refused(tokens, tmp_path, capsys):
    """A gpt2-tiny checkpoint as the loop saves one (zeros: the refusal comes before any weight is read)."""
    import jax

    cfg, train_cfg = get_config("gpt2-tiny", num_layers=1), TrainConfig(total_steps=1, warmup_steps=0)
    shapes = jax.eval_shape(lambda: init_train_state(cfg, train_cfg, jax.random.key(0)))
    checkpointer = Checkpointer(tmp_path / "gpt2" / "checkpoints", async_save=False)
    checkpointer.save(jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes),
                      record=run_record(cfg, train_cfg, loader_state={"step": 0, "seed": 0}, seed=0))
    checkpointer.close()
    assert extend("--ckpt", tmp_path / "gpt2", "--to", 32, "--data", tokens) == 2
    assert last_error(capsys) == ("python -m experiments extend_context: the model has positions='learned' "
                                  "(learned position embeddings), not RoPE; its context cannot be extended by "
                                  "rescaling RoPE")


def test_extends_a_hugging_face_model_with_its_tokenizer(tmp_path, capsys):
    """--hf FOLDER (a real model's form): the base is loaded whole, the shards must be made with its tokenizer, and
    the extended run carries that tokenizer, so `load_model(ckpt=RUN)` (needle, generate) reads it back."""
    import jax

    from llmjax.io.hf import save_hf_checkpoint
    from llmjax.io.models import load_model
    from llmjax.model.transformer import init_params
    from llmjax.tokenizer import load_tokenizer
    from llmjax.tokenizer.bpe_train import train_bpe

    texts = documents(60, 2)
    bpe = train_bpe(texts, 300, num_workers=1, progress=False)
    cfg = get_config("llama-tiny", num_layers=1, max_seq_len=TRAINED, vocab_size=bpe.vocab_size)
    save_hf_checkpoint(init_params(cfg, jax.random.key(0)), cfg, tmp_path / "hf")
    bpe.save_gpt2_files(tmp_path / "hf")
    tokenizer = load_tokenizer(tmp_path / "hf")  # the folder's tokenizer, as load_model reads it
    for split, part in (("train", texts[:50]), ("validation", texts[50:])):
        write_shards(part, tokenizer, tmp_path / "tokens" / split, tokenizer_source=str(tmp_path / "hf"),
                     progress=False)
    out = tmp_path / "extended"
    assert extend("--hf", tmp_path / "hf", "--to", TO, "--data", tmp_path / "tokens", "--steps", 2, "--batch", BATCH,
                  "--warmup", 1, "--eval-batches", 1, "--out", out) == 0
    extension = json.loads((out / "extend_context.json").read_text())
    assert extension["base"] == str(tmp_path / "hf") and extension["rope_scaling"]["factor"] == TO / TRAINED
    extended = load_model(ckpt=out)
    assert extended.cfg.max_seq_len == TO and extended.tokenizer.fingerprint() == tokenizer.fingerprint()

    prog = "python -m experiments extend_context"  # byte-level shards are another tokenizer's
    write_shards(texts, ByteTokenizer(), tmp_path / "bytes" / "train", tokenizer_source="bytes", progress=False)
    assert extend("--hf", tmp_path / "hf", "--to", TO, "--data", tmp_path / "bytes", "--out", tmp_path / "x") == 2
    assert last_error(capsys).startswith(f"{prog}: --data {tmp_path / 'bytes'}: the shards were made with another "
                                         f"tokenizer than {tmp_path / 'hf'}'s")
    assert extend("--hf", tmp_path / "hf", "--to", TO, "--out", tmp_path / "y") == 2
    assert last_error(capsys) == (f"{prog}: --data: give the token shards to fine-tune {tmp_path / 'hf'} on (made by "
                                  f"`python -m experiments tokenize --tokenizer {tmp_path / 'hf'}`)")
