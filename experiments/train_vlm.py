"""Train a Flamingo-style VLM on generated images: a CLIP-trained ViT, a resampler, gated cross-attention, a frozen LM.

Three stages, all on images drawn here (llmjax.data.images: coloured shapes on a grid, captions, questions):
  1. the vision tower: a small ViT trained from scratch with the CLIP loss (symmetric InfoNCE between the pooled
     image and a small text encoder's pooled caption; identical captions in a batch are not negatives) plus, with
     weight --clip-cell-weight, a per-cell loss: the patch features pooled over each grid cell classify that cell's
     colour and shape (or "empty") with two linear heads, which the generator's labels make free to supervise and
     which the caption contrast alone teaches weakly (shapes); unless --vision-tower gives a Hugging Face CLIP /
     SigLIP folder (then the images are resized to its size);
  0. the language model: --lm-ckpt (a run folder of `experiments train`), or a preset trained here briefly on the
     data's text (captions, questions and answers, word-episode texts, no images) into RUN/lm, a run folder;
  2. the VLM: the perceiver resampler, the gated cross-attention blocks and the <image> / <|endofchunk|> rows,
     trained on captions, question-answer pairs and interleaved few-shot episodes (colour_word / shape_word: each
     colour or shape named by a nonsense word that only the in-context examples define); the LM (and the tower,
     unless --train-vision) frozen. Text that sees no image skips the gated blocks, so the LM's text is untouched.

The run folder: config.json, tokenizer.json (the LM's tokenizer plus the two new tokens), checkpoint/ (orbax: every
parameter), metrics.jsonl, loss.png, report.json: held-out caption exact match and attribute accuracy (colour /
shape / count, images.caption_scores) on unseen colour-shape combinations, zero-shot vs k-shot accuracy on the word
tasks (ways = 2: the examples make 1 / 2 the floor of a model that only copies one of their words, zero-shot can only
guess), the LM's text-only validation loss alone, at gate zero (checked equal) and after training, and images/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

IMAGE_SLOT_PAD = 0  # padded image slots hold black images no token sees


def parse_args(argv):
    from llmjax.experiments._flags import apply_quick

    p = argparse.ArgumentParser(
        prog="python -m experiments train_vlm",
        description="Train a Flamingo-style VLM on generated images and write a run folder with report.json "
        "(captions, attributes, few-shot, text loss, images/s). --quick: a CPU toy run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/vlm"), help="the run folder to write")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few steps (a CPU toy run: a few minutes, mostly compiling)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data (llmjax.data.images)")
    g.add_argument("--image-size", type=int, default=64, help="pixels per side of the generated images")
    g.add_argument("--grid", type=int, default=3, help="objects sit on a grid x grid layout")
    g.add_argument("--max-objects", type=int, default=4, help="objects per image: 1 .. this")
    g.add_argument("--train-images", type=int, default=20000, help="the training pool (drawn once)")
    g.add_argument("--workers", type=int, default=1, help="processes drawing the pool")
    g.add_argument("--seq-len", type=int, default=160, help="tokens per training row (the LM's context)")
    g = p.add_argument_group("vision tower (stage 1)")
    g.add_argument("--vision-tower", type=Path, default=None,
                   help="a Hugging Face CLIP / SigLIP folder: its vision tower, frozen (no stage 1)")
    g.add_argument("--vision-from", type=Path, default=None,
                   help="an earlier train_vlm run folder: its stage-1 tower, frozen (no stage 1; with --lm-ckpt "
                        "RUN/lm, stage 2's variants run without redoing stages 0 and 1)")
    g.add_argument("--vision-preset", default="vit-tiny", help="the ViT trained from scratch (llmjax.model.vision)")
    g.add_argument("--patch-size", type=int, default=8)
    g.add_argument("--vision-width", type=int, default=0, help="d_model of the ViT (0: the preset's)")
    g.add_argument("--vision-layers", type=int, default=0, help="layers of the ViT (0: the preset's)")
    g.add_argument("--clip-steps", type=int, default=600, help="CLIP training steps")
    g.add_argument("--clip-batch", type=int, default=256)
    g.add_argument("--clip-lr", type=float, default=1e-3)
    g.add_argument("--clip-temperature", type=float, default=0.07)
    g.add_argument("--clip-cell-weight", type=float, default=10.0,
                   help="weight of the per-cell colour / shape loss beside the CLIP loss (0: CLIP alone); the CLIP "
                        "loss alone ties a shape to the colours it came with in the captions (on a CPU-sized run, "
                        "held-out pairs' cells: shape 48%% at weight 1, 80%% at 10)")
    g.add_argument("--clip-recolour", type=float, default=1.0,
                   help="the share of each CLIP batch also seen recoloured (each palette colour replaced by a random "
                        "colour far from every palette colour), on which alone the per-cell shape head trains: shape "
                        "features that do not depend on the colour, so a shape is recognised in a colour it never had "
                        "in training (the held-out pairs); 0: the shape head trains on the images as drawn")
    g.add_argument("--train-vision", action="store_true", help="keep training the tower in stage 2 (Flamingo: frozen)")
    g = p.add_argument_group("language model (frozen)")
    g.add_argument("--lm-ckpt", type=Path, default=None, help="a run folder of `experiments train` (its tokenizer)")
    g.add_argument("--lm-preset", default="gpt2-mini", help="without --lm-ckpt: this preset, trained here on the "
                   "data's text with the byte tokenizer")
    g.add_argument("--lm-steps", type=int, default=800)
    g.add_argument("--lm-batch", type=int, default=64)
    g.add_argument("--lm-lr", type=float, default=1e-3)
    g = p.add_argument_group("VLM (stage 2)")
    g.add_argument("--latents", type=int, default=16, help="resampler latents per image")
    g.add_argument("--resampler-layers", type=int, default=2)
    g.add_argument("--resampler-heads", type=int, default=4)
    g.add_argument("--xattn-every", type=int, default=1, help="a gated cross-attention block before every N-th layer")
    g.add_argument("--steps", type=int, default=2000, help="stage-2 training steps")
    g.add_argument("--batch", type=int, default=64, help="single-image rows per step (captions, QA)")
    g.add_argument("--episode-batch", type=int, default=16, help="interleaved few-shot episodes per step")
    g.add_argument("--caption-fraction", type=float, default=0.6, help="captions among the image rows (rest: QA)")
    g.add_argument("--colour-swap", type=float, default=0.0,
                   help="probability that a colour word in a caption row is swapped for another colour and not "
                        "scored: the shape named next must then come from the image, not from which shapes that "
                        "colour came with in training (held-out colour-shape pairs); off by default: on the H100 it "
                        "cost colour binding more than it gave (docs/vlm.md)")
    g.add_argument("--vlm-recolour", type=float, default=0.3,
                   help="the share of caption rows shown recoloured (off-palette colours, as --clip-recolour) with "
                        "every colour word swapped for a random palette colour and not scored: the shapes named must "
                        "then be read from an image whose colours say nothing about them, so the resampler and the "
                        "cross-attention cannot tie a shape to the colours it came with (the held-out pairs; "
                        "0.3 measured best on the H100, docs/vlm.md)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup", type=int, default=100)
    g.add_argument("--log-every", type=int, default=50)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-images", type=int, default=500, help="held-out (and validation) images captioned")
    g.add_argument("--eval-episodes", type=int, default=200, help="episodes per task and shot count")
    g.add_argument("--shots", default="0,4,8", help="shot counts evaluated (the largest is trained up to)")
    g.add_argument("--eval-batch", type=int, default=128, help="prompts generated at once")
    args = p.parse_args(argv)
    if args.quick:
        apply_quick(p, args, {"image_size": 40, "grid": 2, "max_objects": 2, "train_images": 160, "seq_len": 96,
                              "vision_width": 32, "vision_layers": 1, "clip_steps": 4, "clip_batch": 16,
                              "lm_preset": "gpt2-tiny", "lm_steps": 4, "lm_batch": 4, "latents": 2,
                              "resampler_layers": 1, "steps": 4, "batch": 6, "episode_batch": 2, "warmup": 1,
                              "log_every": 2, "eval_images": 3, "eval_episodes": 2, "shots": "0,2",
                              "eval_batch": 4})
    try:
        args.shot_list = sorted({int(s) for s in args.shots.split(",")})
    except ValueError:
        p.error(f"--shots {args.shots!r}: give comma-separated integers, e.g. 0,4,8")
    for name in ("train_images", "seq_len", "clip_batch", "lm_batch", "lm_steps", "steps", "batch", "latents",
                 "eval_batch", "patch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    for name in ("clip_steps", "episode_batch", "eval_images", "eval_episodes", "warmup", "clip_cell_weight"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 0")
    if min(args.shot_list) < 0 or max(args.shot_list) > 8:
        p.error(f"--shots {args.shots!r}: shot counts in 0..8")
    for name in ("caption_fraction", "colour_swap", "clip_recolour", "vlm_recolour"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: a fraction in [0, 1]")
    if args.warmup > args.steps:
        p.error(f"--warmup {args.warmup} exceeds --steps {args.steps}")
    if args.lm_ckpt is not None and not args.lm_ckpt.is_dir():
        p.error(f"--lm-ckpt {args.lm_ckpt}: no such run folder")
    if args.vision_tower is not None and not args.vision_tower.is_dir():
        p.error(f"--vision-tower {args.vision_tower}: no such folder")
    if args.vision_from is not None and args.vision_tower is not None:
        p.error("--vision-from and --vision-tower: give one tower")
    if args.vision_from is not None and not args.vision_from.is_dir():
        p.error(f"--vision-from {args.vision_from}: no such run folder")
    return args


# --- data -----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Pool:
    """Training images drawn once: uint8 [n, size, size, 3], their records, and the single-object ones' indices."""

    images: np.ndarray
    records: list
    singles: np.ndarray  # indices of the one-object images (the word tasks' pool)
    by_class: dict  # {"colour" | "shape": {value: [indices of one-object images of it]}}


def data_config(args):
    from llmjax.data.images import ImageDataConfig

    return ImageDataConfig(size=args.image_size, grid=args.grid, max_objects=args.max_objects)


def draw_pool(args, split: str, count: int, seed: int) -> Pool:
    from tqdm import tqdm

    from llmjax.data.images import example_chunks

    images, records = [], []
    with tqdm(total=count, desc=f"drawing {split} images", unit="img", dynamic_ncols=True) as bar:
        for chunk_images, chunk_records in example_chunks(seed, split, count, data_config(args), args.workers):
            images.append(chunk_images)
            records.extend(chunk_records)
            bar.update(len(chunk_records))
    singles = np.array([i for i, r in enumerate(records) if r["labels"]["count"] == 1], np.int64)
    by_class: dict = {"colour": {}, "shape": {}}
    for index in singles.tolist():
        for attribute, values in by_class.items():
            values.setdefault(records[index]["labels"]["objects"][0][attribute], []).append(index)
    return Pool(np.concatenate(images), records, singles, by_class)


def text_documents(pool: Pool, rng: np.random.Generator, episodes: int) -> list[str]:
    """The data's text without images: captions, 'Question: ... Answer: ...' lines, and word episodes (each chunk
    on its own line), for the LM."""
    docs = []
    for record in pool.records:
        docs.append(f"Caption: {record['caption']}")
        docs.extend(f"Question: {q} Answer: {a}" for q, a in record["qa"])
    for _ in range(episodes if len(pool.singles) else 0):
        segments = word_episode_segments(pool, rng, int(rng.integers(1, 9)))[0]
        docs.append("".join(text for text, _ in segments if text != "<image>").replace("<|endofchunk|>", "\n"))
    return docs


def every_pair_text(args, rng: np.random.Generator, count: int) -> list[str]:
    """Captions and QA lines of `count` random scenes over every colour-shape pair, text only: the LM's text names
    the held-out pairs too (as any LM's text would), while stage 2's images never show them."""
    from llmjax.data.images import caption, questions, random_scene

    docs = []
    for _ in range(count):
        scene = random_scene(rng, max_objects=args.max_objects, grid=args.grid)
        docs.append(f"Caption: {caption(scene)}")
        docs.extend(f"Question: {q} Answer: {a}" for q, a in questions(scene, rng, 2))
    return docs


def word_episode_segments(pool: Pool, rng: np.random.Generator, shots: int, ways: int | None = None):
    """A training episode of the word tasks drawn from the pool's one-object images, as episode_for builds them
    (llmjax.data.images): classes, nonsense words drawn afresh, shots cycling through the classes, the query's class
    one the examples showed. -> (segments [(text, scored)], image indices)."""
    from llmjax.data.images import END_OF_CHUNK, IMAGE_TOKEN, NONSENSE_WORDS, PALETTE, SHAPES

    task = ("colour_word", "shape_word")[int(rng.integers(0, 2))]
    attribute = "colour" if task == "colour_word" else "shape"
    by_class = pool.by_class[attribute]
    values = [v for v in (PALETTE if attribute == "colour" else SHAPES) if v in by_class]
    ways = ways or int(rng.integers(2, 4))
    ways = max(1, min(ways, len(values)))
    classes = [values[i] for i in rng.choice(len(values), size=ways, replace=False)]
    words = [NONSENSE_WORDS[i] for i in rng.choice(len(NONSENSE_WORDS), size=ways, replace=False)]
    mapping = dict(zip(classes, words))
    shown = [classes[i % ways] for i in range(shots)]
    rng.shuffle(shown)
    query = shown[int(rng.integers(0, shots))] if shots else classes[0]
    segments, indices = [], []
    for number, value in enumerate([*shown, query]):
        options = by_class[value]
        indices.append(options[int(rng.integers(0, len(options)))])
        segments.append((f"{IMAGE_TOKEN}Word:", False))
        if number < shots:
            segments += [(f" {mapping[value]}", True), (END_OF_CHUNK, False)]
        else:
            segments.append((f" {mapping[value]}<|endoftext|>", True))
    return segments, indices


def encode_segments(tokenizer, segments, seq_len: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """[(text, scored)] -> (tokens [seq_len] int32 right-padded, loss mask [seq_len - 1]: target t + 1 scored)."""
    ids, scored = [], []
    for text, is_scored in segments:
        piece = tokenizer.encode(text)
        ids += piece
        scored += [is_scored] * len(piece)
    if len(ids) > seq_len:
        raise SystemExit(f"a {what} row has {len(ids)} tokens, more than --seq-len {seq_len}: raise --seq-len")
    tokens = np.zeros(seq_len, np.int32)
    mask = np.zeros(seq_len - 1, bool)
    tokens[:len(ids)] = ids
    mask[:len(ids) - 1] = scored[1:]
    return tokens, mask


def single_segments(record: dict, kind: str, rng: np.random.Generator, colour_swap: float = 0.0):
    """A caption or QA row as [(text, scored)]; colour_swap: see caption_segments."""
    if kind == "caption":
        return [("<image>Caption:", False), *caption_segments(record["caption"], rng, colour_swap),
                ("<|endoftext|>", True)]
    if kind == "qa":
        question, answer = record["qa"][int(rng.integers(0, len(record["qa"])))]
        return [(f"<image>Question: {question} Answer:", False), (f" {answer}<|endoftext|>", True)]
    raise ValueError(f"unknown row kind {kind!r}")


def caption_segments(caption: str, rng: np.random.Generator, swap: float) -> list[tuple[str, bool]]:
    """The caption as [(text, scored)] with each colour word, with probability `swap`, replaced by another colour
    and left unscored: the row then reads a wrong colour before the object's (scored) shape, which the model can
    only get from the image. Without it, the shapes a colour came with in training ("blue" never before "circle":
    the held-out pairs) are a shortcut the model learns instead of looking."""
    from llmjax.data.images import PALETTE

    colours = list(PALETTE)
    segments, scored_text = [], ""
    for word in caption.split(" "):
        if word in PALETTE and rng.random() < swap:
            others = [c for c in colours if c != word]
            segments += [(scored_text, True)] if scored_text else []
            segments.append((f" {others[int(rng.integers(0, len(others)))]}", False))
            scored_text = ""
        else:
            scored_text += f" {word}"
    return segments + ([(scored_text, True)] if scored_text else [])


def single_batch(pool: Pool, rng, args, tokenizer):
    """{"tokens" [B, seq], "mask" [B, seq - 1], "images" [B, 1, size, size, 3]}: captions and QA rows (no text-only
    rows: a token that sees no image skips the gated blocks, so they would train nothing). With --vlm-recolour, also
    "recolour" [B] bool (the rows whose image the step recolours) and "tables" [B, colours, 3] uint8 (their colours:
    recoloured's table)."""
    from llmjax.data.images import PALETTE

    rows, masks = [], []
    chosen = rng.integers(0, len(pool.records), size=args.batch)
    recolour = np.zeros(args.batch, bool)
    for row, index in enumerate(chosen):
        kind = "caption" if rng.random() < args.caption_fraction else "qa"
        if kind == "qa" and not pool.records[index]["qa"]:
            kind = "caption"
        recolour[row] = kind == "caption" and rng.random() < args.vlm_recolour
        segments = single_segments(pool.records[index], kind, rng, 1.0 if recolour[row] else args.colour_swap)
        tokens, mask = encode_segments(tokenizer, segments, args.seq_len, kind)
        rows.append(tokens)
        masks.append(mask)
    batch = {"tokens": np.stack(rows), "mask": np.stack(masks), "images": pool.images[chosen][:, None]}
    if args.vlm_recolour:
        tables = np.zeros((args.batch, len(PALETTE), 3), np.uint8)
        tables[recolour] = off_palette_colours(rng, int(recolour.sum()) * len(PALETTE)).reshape(-1, len(PALETTE), 3)
        batch |= {"recolour": recolour, "tables": tables}
    return batch


def training_batch(pool: Pool, rng, args, tokenizer) -> dict:
    """One step's rows: --batch single-image rows then --episode-batch episodes, in one array each ({"tokens" [rows,
    seq], "mask" [rows, seq - 1], "images" [rows, max shots + 1, size, size, 3]}; a single-image row's other slots
    are black images no token sees): one compiled step for both kinds. "recolour" / "tables" (single_batch) cover
    the first --batch rows."""
    single = single_batch(pool, rng, args, tokenizer)
    slots = max(args.shot_list) + 1
    images = np.zeros((len(single["images"]), slots, *pool.images.shape[1:]), np.uint8)
    images[:, :1] = single["images"]
    single["images"] = images
    if not args.episode_batch:
        return single
    episodes = episode_batch(pool, rng, args, tokenizer)
    return single | {key: np.concatenate([single[key], episodes[key]]) for key in episodes}


def episode_batch(pool: Pool, rng, args, tokenizer):
    """{"tokens", "mask", "images" [B, max shots + 1, size, size, 3]}: word-task episodes of 1 .. max shots."""
    slots = max(args.shot_list) + 1
    rows, masks = [], []
    images = np.zeros((args.episode_batch, slots, *pool.images.shape[1:]), np.uint8)
    for b in range(args.episode_batch):
        segments, indices = word_episode_segments(pool, rng, int(rng.integers(1, slots)))
        tokens, mask = encode_segments(tokenizer, segments, args.seq_len, "episode")
        rows.append(tokens)
        masks.append(mask)
        images[b, :len(indices)] = pool.images[indices]
    return {"tokens": np.stack(rows), "mask": np.stack(masks), "images": images}


# --- stage 0: the language model ------------------------------------------------------------------------------------

def language_model(args, out: Path, pool: Pool, validation: Pool):
    """(lm params, ModelConfig, base tokenizer, where it came from): --lm-ckpt, or a preset trained here."""
    from llmjax.io.models import ModelLoadError, load_model

    if args.lm_ckpt is not None:
        try:
            model = load_model(ckpt=args.lm_ckpt)
        except ModelLoadError as error:
            raise SystemExit(f"--lm-ckpt: {error}") from None
        return model.params, model.cfg, model.tokenizer, str(args.lm_ckpt)
    import jax

    from llmjax.config import TrainConfig, get_config
    from llmjax.data.loader import ArrayTokens
    from llmjax.io.models import restore_params
    from llmjax.tokenizer import load_tokenizer
    from llmjax.train.loop import RunConfig, train

    tokenizer = load_tokenizer("bytes")
    rng = np.random.default_rng(args.seed + 7)

    def stream(documents):
        ids, starts = [], []
        for doc in documents:
            starts.append(len(ids))
            ids += tokenizer.encode(doc) + [tokenizer.eot_id]
        return ArrayTokens(np.asarray(ids, np.uint16), np.asarray(starts, np.int64))

    cfg = get_config(args.lm_preset, vocab_size=tokenizer.vocab_size, max_seq_len=args.seq_len)
    lm_dir = out / "lm"
    train_data = stream(text_documents(pool, rng, len(pool.records)) + every_pair_text(args, rng, len(pool.records)))
    validation_data = stream(text_documents(validation, rng, len(validation.records)))
    run = RunConfig(run_dir=lm_dir, batch_size=args.lm_batch, seq_len=args.seq_len, seed=args.seed,
                    log_every=max(1, min(50, args.lm_steps)), eval_every=max(1, args.lm_steps),
                    eval_batches=2, save_every=max(1, args.lm_steps), keep_last=1, async_checkpoints=False,
                    sample_tokens=0)
    train_cfg = TrainConfig(lr=args.lm_lr, warmup_steps=min(50, args.lm_steps // 10), total_steps=args.lm_steps)
    train(cfg, train_cfg, run, train_data, validation_data)
    tokenizer.save(lm_dir / "tokenizer.json")
    params, cfg = restore_params(lm_dir)
    jax.block_until_ready(params)
    return params, cfg, tokenizer, f"{args.lm_preset} trained here ({args.lm_steps} steps): {lm_dir}"


# --- stage 1: the vision tower --------------------------------------------------------------------------------------

def scratch_vision_config(args):
    from llmjax.model.vision import get_vision_config

    base = get_vision_config(args.vision_preset)
    model = base.model
    if args.vision_width:
        heads = max(1, args.vision_width // 16)
        model = model.replace(d_model=args.vision_width, num_heads=heads, num_kv_heads=None, head_dim=None,
                              d_ff=4 * args.vision_width)
    if args.vision_layers:
        model = model.replace(num_layers=args.vision_layers)
    tokens = (args.image_size // args.patch_size) ** 2 + int(base.class_token)
    try:
        return base.replace(image_size=args.image_size, patch_size=args.patch_size,
                            model=model.replace(max_seq_len=tokens))
    except ValueError as error:
        raise SystemExit(f"--patch-size / --image-size: {error}") from None


def cell_pooling(vcfg, grid: int) -> np.ndarray:
    """The mean over each grid cell's patches (a patch belongs to the cell holding its centre): float32 [tokens,
    grid * grid], zero on the class token's row."""
    side = vcfg.image_size // vcfg.patch_size
    centres = (np.arange(side) + 0.5) / side  # patch centres, canvas fractions
    cell_of = np.minimum((centres * grid).astype(int), grid - 1)
    cells = (cell_of[:, None] * grid + cell_of[None, :]).reshape(-1)  # [patches], row-major like the patches
    pooling = np.zeros((int(vcfg.class_token) + side * side, grid * grid), np.float32)
    pooling[int(vcfg.class_token) + np.arange(side * side), cells] = 1.0
    return pooling / np.maximum(pooling.sum(0, keepdims=True), 1.0)


def cell_targets(records: list, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image and cell: (colour, shape) classes, 0 for an empty cell, else 1 + the index in PALETTE / SHAPES:
    int32 [images, grid * grid] each."""
    from llmjax.data.images import PALETTE, SHAPES

    colours, shapes = list(PALETTE), list(SHAPES)
    colour = np.zeros((len(records), grid * grid), np.int32)
    shape = np.zeros_like(colour)
    for row, record in enumerate(records):
        for item in record["labels"]["objects"]:
            cell = item["row"] * grid + item["column"]
            colour[row, cell] = 1 + colours.index(item["colour"])
            shape[row, cell] = 1 + shapes.index(item["shape"])
    return colour, shape


OFF_PALETTE_DISTANCE = 80  # RGB distance an augmentation colour keeps from every palette colour, black and white


def off_palette_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """count random RGB colours [count, 3] uint8, each at least OFF_PALETTE_DISTANCE from every palette colour, the
    background's black and a digit's white: colours no caption names."""
    from llmjax.data.images import BACKGROUND, GLYPH_COLOUR, PALETTE

    avoid = np.array([*PALETTE.values(), BACKGROUND, GLYPH_COLOUR], np.float32)
    found = np.zeros((0, 3), np.uint8)
    while len(found) < count:
        draws = rng.integers(0, 256, size=(4 * count, 3))
        far = np.min(np.linalg.norm(draws[:, None, :] - avoid[None], axis=-1), axis=1) >= OFF_PALETTE_DISTANCE
        found = np.concatenate([found, draws[far].astype(np.uint8)])
    return found[:count]


def recoloured(images, table):
    """images [b, h, w, 3] uint8 with palette colour k's pixels set to table [b, colours, 3] uint8's colour k (drawn
    per image by off_palette_colours): the same shapes in colours no caption names, so no held-out colour-shape pair
    is ever shown. Traced inside the training step: the host only draws the table."""
    import jax.numpy as jnp

    from llmjax.data.images import PALETTE

    out = images
    for k, rgb in enumerate(PALETTE.values()):
        is_colour = jnp.all(images == jnp.asarray(rgb, jnp.uint8), axis=-1, keepdims=True)  # [b, h, w, 1]
        out = jnp.where(is_colour, table[:, None, None, k], out)
    return out


def train_clip(args, vcfg, pool: Pool, validation: Pool, tokenizer, log, heldout: Pool | None = None):
    """A ViT and a small text encoder trained with the CLIP loss (plus the per-cell loss). -> (vision params,
    stats). heldout: images with held-out colour-shape pairs, whose cells the per-cell heads are also scored on (does
    the tower tell a shape apart in a colour it never saw it in?)."""
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm import tqdm

    from llmjax.config import ModelConfig, TrainConfig
    from llmjax.data.images import PALETTE, SHAPES
    from llmjax.embed import embed_tokens
    from llmjax.model import init_params
    from llmjax.model.vision import encode_images, init_vision_params
    from llmjax.retrieval.contrastive import info_nce_loss
    from llmjax.train.optim import make_optimizer

    d = vcfg.model.d_model
    captions = [r["caption"] for r in pool.records]
    length = max(len(tokenizer.encode(c)) for c in captions + [r["caption"] for r in validation.records])
    text_cfg = ModelConfig(name="clip-text", vocab_size=tokenizer.vocab_size, d_model=d, num_layers=2,
                           num_heads=max(1, d // 16), d_ff=4 * d, causal=False, max_seq_len=length,
                           vocab_multiple=64, compute_dtype=vcfg.model.compute_dtype)
    keys = jax.random.split(jax.random.key(args.seed), 6)
    params = {"vision": init_vision_params(vcfg, keys[0]), "text": init_params(text_cfg, keys[1]),
              "image_proj": 0.02 * jax.random.normal(keys[2], (d, d)),
              "text_proj": 0.02 * jax.random.normal(keys[3], (d, d)),
              "cell_colour": 0.02 * jax.random.normal(keys[4], (d, 1 + len(PALETTE))),
              "cell_shape": 0.02 * jax.random.normal(keys[5], (d, 1 + len(SHAPES)))}
    pooling = jnp.asarray(cell_pooling(vcfg, args.grid))  # [tokens, cells]
    train_colour, train_shape = cell_targets(pool.records, args.grid)
    optimizer = make_optimizer(TrainConfig(lr=args.clip_lr, warmup_steps=min(50, args.clip_steps // 10),
                                           total_steps=max(1, args.clip_steps)))
    state = optimizer.init(params)

    def encode_captions(texts):
        tokens = np.zeros((len(texts), length), np.int32)
        mask = np.zeros((len(texts), length), bool)
        for row, text in enumerate(texts):
            ids = tokenizer.encode(text)
            tokens[row, :len(ids)], mask[row, :len(ids)] = ids, True
        return tokens, mask

    def towered(params, images):
        """-> (each grid cell's mean patch feature [b, cells, d], the pooled image feature [b, d])."""
        hidden, pooled = encode_images(params["vision"], images, vcfg)  # [b, tokens, d], [b, d]
        return jnp.einsum("btd,tc->bcd", hidden.astype(jnp.float32), pooling), pooled

    def embeddings(params, images, tokens, mask):
        """-> (image [b, d], text [b, d]) unit vectors, cell logits (colour [b, cells, 7], shape [b, cells, 5])."""
        cells, pooled = towered(params, images)
        image = pooled @ params["image_proj"]
        text = embed_tokens(params["text"], tokens, mask, text_cfg, pooling="mean", normalize=False) @ params[
            "text_proj"]
        normalize = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        return normalize(image), normalize(text), (cells @ params["cell_colour"], cells @ params["cell_shape"])

    def cell_loss(logits, colour, shape):
        """Colour from the images as drawn; shape too unless recoloured copies teach it (--clip-recolour)."""
        loss = optax.softmax_cross_entropy_with_integer_labels(logits[0], colour).mean()
        if not args.clip_recolour:
            loss += optax.softmax_cross_entropy_with_integer_labels(logits[1], shape).mean()
        return loss

    def recoloured_shape_loss(params, images, table, shape):
        """The per-cell shape head's loss on the first len(table) images recoloured (0 for an empty table)."""
        if not len(table):
            return 0.0
        cells, _ = towered(params, recoloured(images[:len(table)], table))
        return optax.softmax_cross_entropy_with_integer_labels(cells @ params["cell_shape"], shape).mean()

    @jax.jit
    def step(params, state, images, tokens, mask, ids, colour, shape, table):
        def loss_fn(params):
            image, text, cell_logits = embeddings(params, images, tokens, mask)
            contrast = info_nce_loss(image, text, temperature=args.clip_temperature, symmetric=True, doc_ids=ids)
            cells = cell_loss(cell_logits, colour, shape)
            cells += recoloured_shape_loss(params, images, table, shape[:len(table)])
            return contrast + args.clip_cell_weight * cells

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(args.seed + 1)
    seen, start = 0, None
    for number in tqdm(range(args.clip_steps), desc="stage 1: CLIP", unit="step", dynamic_ncols=True):
        chosen = rng.integers(0, len(pool.records), size=args.clip_batch)
        texts = [captions[i] for i in chosen]
        _, ids = np.unique(texts, return_inverse=True)  # the same caption twice is not a negative
        tokens, mask = encode_captions(texts)
        recolour = round(args.clip_recolour * len(chosen))
        table = off_palette_colours(rng, recolour * len(PALETTE)).reshape(recolour, len(PALETTE), 3)
        params, state, loss = step(params, state, pool.images[chosen], tokens, mask, ids.astype(np.int32),
                                   train_colour[chosen], train_shape[chosen], table)
        if number == 0:
            jax.block_until_ready(loss)
            start = time.perf_counter()
        else:
            seen += args.clip_batch
        if (number + 1) % args.log_every == 0 or number + 1 == args.clip_steps:
            log({"stage": "clip", "step": number + 1, "loss": float(loss)})
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - start if start is not None else 0.0
    count = min(256, len(validation.records))
    image, text, (colour_logits, shape_logits) = jax.jit(embeddings)(
        params, validation.images[:count], *encode_captions([r["caption"] for r in validation.records[:count]]))
    scores = np.asarray(image @ text.T)
    truth = [r["caption"] for r in validation.records[:count]]
    top1 = float(np.mean([truth[int(np.argmax(scores[i]))] == truth[i] for i in range(count)]))
    stats = {"steps": args.clip_steps, "images_per_second": seen / elapsed if elapsed else None,
             "validation_caption_top1": top1, "validation_images": count,
             "validation_cell_accuracy": cell_probe(validation.records[:count], colour_logits, shape_logits, args.grid),
             "final_loss": float(loss) if args.clip_steps else None}
    if heldout is not None:
        count = min(256, len(heldout.records))
        _, _, (colour_logits, shape_logits) = jax.jit(embeddings)(
            params, heldout.images[:count], *encode_captions([r["caption"] for r in heldout.records[:count]]))
        stats["heldout_cell_accuracy"] = cell_probe(heldout.records[:count], colour_logits, shape_logits, args.grid)
    return params["vision"], stats


def cell_probe(records: list, colour_logits, shape_logits, grid: int) -> dict:
    """The per-cell heads' accuracy: colour and shape over every cell (empty ones included), and over the cells
    holding an object of a held-out colour-shape pair ("heldout_pair_*", where there are any)."""
    from llmjax.data.images import HELD_OUT_PAIRS, PALETTE, SHAPES

    colour, shape = cell_targets(records, grid)
    colour_hit = np.argmax(np.asarray(colour_logits), -1) == colour
    shape_hit = np.argmax(np.asarray(shape_logits), -1) == shape
    result = {"colour": float(np.mean(colour_hit)), "shape": float(np.mean(shape_hit))}
    held_out = np.zeros((1 + len(PALETTE), 1 + len(SHAPES)), bool)  # [colour id, shape id]: 0 is "empty"
    for colour_name, shape_name in HELD_OUT_PAIRS:
        held_out[1 + list(PALETTE).index(colour_name), 1 + SHAPES.index(shape_name)] = True
    pair = held_out[colour, shape]
    if pair.any():
        result.update(heldout_pair_colour=float(np.mean(colour_hit[pair])),
                      heldout_pair_shape=float(np.mean(shape_hit[pair])), heldout_pair_cells=int(pair.sum()))
    return result


# --- stage 2 --------------------------------------------------------------------------------------------------------

def shown_images(batch: dict):
    """batch["images"] [rows, slots, h, w, 3] with the first slot of the rows batch["recolour"] marks recoloured by
    batch["tables"] (single_batch; as drawn without them). Traced inside the training step."""
    import jax.numpy as jnp

    images = batch["images"]
    if "tables" not in batch:
        return images
    count = len(batch["tables"])
    first = images[:count, 0]
    first = jnp.where(batch["recolour"][:, None, None, None], recoloured(first, batch["tables"]), first)
    return jnp.asarray(images).at[:count, 0].set(first)


def train_vlm_stage(args, cfg, params, pool: Pool, tokenizer, log):
    """Resampler, cross-attention and new token rows trained (the tower too with --train-vision). -> (params, stats)"""
    import jax
    import optax
    from tqdm import tqdm

    from llmjax.config import TrainConfig
    from llmjax.model.flamingo import split_trainable, token_losses, visual_latents
    from llmjax.train.optim import make_optimizer

    trainable, frozen = split_trainable(params, args.train_vision)
    optimizer = make_optimizer(TrainConfig(lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps))
    state = optimizer.init(trainable)

    @jax.jit
    def step(trainable, state, frozen, batch):
        def loss_fn(trainable):
            merged = {**frozen, **trainable}
            latents = visual_latents(merged, shown_images(batch), cfg)
            total, count = token_losses(merged, batch["tokens"], latents, batch["mask"], cfg)
            return total / jax.numpy.maximum(count, 1)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, state = optimizer.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    rng = np.random.default_rng(args.seed + 2)
    images_seen, start, loss = 0, None, None
    for number in tqdm(range(args.steps), desc="stage 2: VLM", unit="step", dynamic_ncols=True):
        batch = training_batch(pool, rng, args, tokenizer)
        real = int(np.sum(batch["tokens"] == cfg.image_token_id))  # images some token sees
        trainable, state, loss = step(trainable, state, frozen, batch)
        if number == 0:
            jax.block_until_ready(loss)
            start = time.perf_counter()
        else:
            images_seen += real
        if (number + 1) % args.log_every == 0 or number + 1 == args.steps:
            log({"stage": "vlm", "step": number + 1, "loss": float(loss)})
    jax.block_until_ready(trainable)
    elapsed = time.perf_counter() - start if start is not None else 0.0
    gates = {name: np.tanh(np.asarray(trainable["xattn"][name])).round(4).tolist()
             for name in ("alpha_attn", "alpha_mlp")}
    return {**frozen, **trainable}, {"steps": args.steps, "final_loss": float(loss) if loss is not None else None,
                                     "images_per_second": images_seen / elapsed if elapsed else None,
                                     "steps_per_second": (args.steps - 1) / elapsed if elapsed else None,
                                     "tanh_gates": gates, "seconds": elapsed}


# --- evaluation -----------------------------------------------------------------------------------------------------

def generate_texts(params, cfg, tokenizer, prompts: list[str], images: list[list[np.ndarray]], max_new: int,
                   batch: int, prepared) -> list[str]:
    from llmjax.infer.vlm import vlm_generate

    texts = []
    for start in range(0, len(prompts), batch):
        ids = [tokenizer.encode(p) for p in prompts[start:start + batch]]
        row_images = list(images[start:start + batch])
        real = len(ids)
        ids += [ids[0]] * (min(batch, len(prompts)) - real)  # a short last batch padded: the same shapes, no compile
        row_images += [row_images[0]] * (len(ids) - real)
        out = vlm_generate(params, cfg, ids, row_images, max_new_tokens=max_new, eos_id=tokenizer.eot_id,
                           prepared=prepared)
        texts += [tokenizer.decode([t for t in row if t != tokenizer.eot_id]).strip() for row in out.tokens[:real]]
    return texts


def caption_report(params, cfg, tokenizer, args, split: str, prepared, examples: list) -> dict:
    from llmjax.data.images import caption_scores, examples as draw_examples

    images, records = draw_examples(args.seed + 11, split, 0, args.eval_images, data_config(args))
    longest = 4 + 20 * args.max_objects  # room for any caption of the data (the same for every split: one compile)
    predicted = generate_texts(params, cfg, tokenizer, ["<image>Caption:"] * len(records),
                               [[image] for image in images], min(longest, args.seq_len - 16), args.eval_batch,
                               prepared)
    scores = [caption_scores(text, r["labels"]) for text, r in zip(predicted, records)]
    report = {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
    report["attribute_accuracy"] = float(np.mean([report[k] for k in ("colour", "shape", "count")]))
    report["images"] = len(records)
    examples += [{"split": split, "truth": r["caption"], "predicted": text}
                 for text, r in list(zip(predicted, records))[:5]]
    return report


def few_shot_report(params, cfg, tokenizer, args, prepared) -> dict:
    from llmjax.data.images import episode_for

    report = {"ways": 2, "episodes": args.eval_episodes, "split": "validation",
              "floor_with_examples": 0.5, "chance_zero_shot": 1 / 16}
    for task in ("colour_word", "shape_word"):
        report[task] = {}
        for shots in args.shot_list:
            episodes = [episode_for(args.seed + 13, "validation", i, task, shots, 2, data_config(args))
                        for i in range(args.eval_episodes)]
            predicted = generate_texts(params, cfg, tokenizer, [e.prompt for e in episodes],
                                       [list(e.images) for e in episodes], 10, args.eval_batch, prepared)
            report[task][str(shots)] = float(np.mean([p == e.answer for p, e in zip(predicted, episodes)]))
    return report


def text_rows(tokenizer, pool: Pool, args) -> dict:
    """The validation text (captions and QA lines, no images) as rows for the text-only loss."""
    rows, masks = [], []
    for record in pool.records:
        for text in [f"Caption: {record['caption']}"] + [f"Question: {q} Answer: {a}" for q, a in record["qa"][:1]]:
            tokens, mask = encode_segments(tokenizer, [(text + "<|endoftext|>", True)], args.seq_len, "text")
            rows.append(tokens)
            masks.append(mask)
    return {"tokens": np.stack(rows), "mask": np.stack(masks)}


def text_losses(params, cfg, rows: dict, batch: int) -> tuple[float, float]:
    """(the LM's own mean loss on the rows, the VLM's with no images): the same cross-entropy code on each's logits."""
    import jax

    from llmjax.model import forward
    from llmjax.model.flamingo import cross_entropy_sums, token_losses

    @jax.jit
    def both(params, tokens, mask):
        lm = cross_entropy_sums(forward(params["lm"], tokens[:, :-1], cfg.lm), tokens[:, 1:], mask, cfg.lm.vocab_size)
        return lm, token_losses(params, tokens, None, mask, cfg)

    sums = np.zeros((2, 2), np.float64)
    for start in range(0, len(rows["tokens"]), batch):
        (lm_sum, lm_count), (vlm_sum, vlm_count) = both(params, rows["tokens"][start:start + batch],
                                                        rows["mask"][start:start + batch])
        sums += [[float(lm_sum), float(lm_count)], [float(vlm_sum), float(vlm_count)]]
    return sums[0, 0] / sums[0, 1], sums[1, 0] / sums[1, 1]


def plot_losses(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("clip", "vlm") if any(m["stage"] == s for m in metrics)]
    figure, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.5), squeeze=False)
    for axis, stage in zip(axes[0], stages):
        points = [(m["step"], m["loss"]) for m in metrics if m["stage"] == stage]
        axis.plot(*zip(*points), marker=".")
        axis.set_title({"clip": "stage 1: CLIP loss", "vlm": "stage 2: VLM loss (frozen LM)"}[stage])
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- main -----------------------------------------------------------------------------------------------------------

def fresh_arrays(tree):
    """A restored checkpoint's arrays copied to plain device arrays: they carry the checkpoint's mesh sharding,
    which the step's outputs would inherit, so the second step would compile again (device_put to an equivalent
    placement keeps it)."""
    import jax

    return jax.tree.map(lambda a: jax.numpy.asarray(np.asarray(a)), tree)


def vision_tower(args, pool, validation, tokenizer, log):
    """(vision params, VisionConfig, stats): an imported tower, an earlier run's (its stage-1 stats), or stage 1."""
    if args.vision_from is not None:
        from llmjax.experiments.vlm_generate import load_run

        params, cfg, _ = load_run(args.vision_from)
        if cfg.vision.image_size != args.image_size:
            raise SystemExit(f"--vision-from {args.vision_from} takes {cfg.vision.image_size}x{cfg.vision.image_size} "
                             f"images; pass --image-size {cfg.vision.image_size}")
        earlier = args.vision_from / "report.json"
        stats = json.loads(earlier.read_text()).get("stage1", {}) if earlier.is_file() else {}
        return fresh_arrays(params["vision"]), cfg.vision, {**stats, "from_run": str(args.vision_from)}
    if args.vision_tower is not None:
        from llmjax.io.hf import CheckpointMismatchError
        from llmjax.io.hf_vision import load_hf_vision

        try:
            params, vcfg = load_hf_vision(args.vision_tower)
        except CheckpointMismatchError as error:
            raise SystemExit(f"--vision-tower: {error}") from None
        if vcfg.image_size != args.image_size:
            raise SystemExit(f"--vision-tower takes {vcfg.image_size}x{vcfg.image_size} images; pass --image-size "
                             f"{vcfg.image_size} (the generated images are drawn at that size)")
        return params, vcfg, {"imported": str(args.vision_tower)}
    vcfg = scratch_vision_config(args)
    heldout = draw_pool(args, "heldout", min(256, max(8, args.eval_images)), args.seed + 5)
    params, stats = train_clip(args, vcfg, pool, validation, tokenizer, log, heldout)
    return params, vcfg, stats


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import jax

    from llmjax.data.images import END_OF_CHUNK, IMAGE_TOKEN, ImageDataError
    from llmjax.model.flamingo import FlamingoConfig, flamingo_config_to_dict, init_flamingo_params
    from llmjax.tokenizer.extended import with_special_tokens
    from llmjax.train.checkpoint import save

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    clock = time.perf_counter()
    try:
        pool = draw_pool(args, "train", args.train_images, args.seed)
        validation = draw_pool(args, "validation", max(8, args.eval_images), args.seed + 1)
    except ImageDataError as error:
        raise SystemExit(f"data: {error}") from None
    if not len(pool.singles):
        raise SystemExit("the training pool has no one-object image for the word tasks: draw more --train-images")
    timings["data_seconds"] = time.perf_counter() - clock
    metrics_file = open(out / "metrics.jsonl", "w")
    metrics = []

    def log(values: dict) -> None:
        metrics.append(values)
        metrics_file.write(json.dumps(values) + "\n")
        metrics_file.flush()

    clock = time.perf_counter()
    lm_params, lm_cfg, base_tokenizer, lm_source = language_model(args, out, pool, validation)
    lm_params = fresh_arrays(lm_params)
    timings["lm_seconds"] = time.perf_counter() - clock
    if base_tokenizer.eot_id is None:
        raise SystemExit("the LM's tokenizer has no <|endoftext|>: answers need an end token")
    if lm_cfg.max_seq_len < args.seq_len:
        raise SystemExit(f"the LM's max_seq_len={lm_cfg.max_seq_len} is below --seq-len {args.seq_len}")
    tokenizer = with_special_tokens(base_tokenizer, [IMAGE_TOKEN, END_OF_CHUNK], first_id=lm_cfg.vocab_size)
    tokenizer.save(out / "tokenizer.json")

    clock = time.perf_counter()
    vision_params, vcfg, stage1 = vision_tower(args, pool, validation, base_tokenizer, log)
    timings["stage1_seconds"] = time.perf_counter() - clock
    if "heldout_cell_accuracy" in stage1:
        cells, held = stage1["validation_cell_accuracy"], stage1["heldout_cell_accuracy"]
        print(f"stage 1: cells colour / shape {cells['colour']:.1%} / {cells['shape']:.1%} (validation); the held-out "
              f"pairs' cells {held.get('heldout_pair_colour', 0):.1%} / {held.get('heldout_pair_shape', 0):.1%}")
    cfg = FlamingoConfig(lm=lm_cfg, vision=vcfg, num_latents=args.latents, resampler_layers=args.resampler_layers,
                         resampler_heads=args.resampler_heads, xattn_every=args.xattn_every,
                         max_images=max(args.shot_list) + 1)
    params = init_flamingo_params(cfg, jax.random.key(args.seed + 3), lm_params=lm_params,
                                  vision_params=vision_params)
    rows = text_rows(base_tokenizer, validation, args)
    lm_loss, gate_zero_loss = text_losses(params, cfg, rows, args.eval_batch)

    clock = time.perf_counter()
    params, stage2 = train_vlm_stage(args, cfg, params, pool, tokenizer, log)
    timings["stage2_seconds"] = time.perf_counter() - clock
    (out / "config.json").write_text(json.dumps({"flamingo": flamingo_config_to_dict(cfg), "lm_source": lm_source,
                                                 "image_data": dataclasses.asdict(data_config(args)),
                                                 "args": {k: str(v) if isinstance(v, Path) else v
                                                          for k, v in vars(args).items()}}, indent=2))
    save(out / "checkpoint", params, step=args.steps)
    _, after_loss = text_losses(params, cfg, rows, args.eval_batch)

    clock = time.perf_counter()
    from llmjax.infer.vlm import prepare_vlm_params

    prepared = prepare_vlm_params(params, cfg)
    examples = []
    captions = {split: caption_report(params, cfg, tokenizer, args, split, prepared, examples)
                for split in ("heldout", "validation")}
    few_shot = few_shot_report(params, cfg, tokenizer, args, prepared)
    timings["eval_seconds"] = time.perf_counter() - clock
    metrics_file.close()
    plot_losses(metrics, out / "loss.png")
    report = {
        "captions": captions,
        "caption_examples": examples,
        "few_shot": few_shot,
        "text_loss": {"lm": float(lm_loss), "gate_zero": float(gate_zero_loss),
                      "gate_zero_equal": bool(lm_loss == gate_zero_loss),
                      "after": float(after_loss), "relative_change": float((after_loss - lm_loss) / lm_loss),
                      "rows": int(len(rows["tokens"]))},
        "stage1": stage1,
        "stage2": stage2,
        "throughput": {"stage2_images_per_second": stage2["images_per_second"],
                       "stage1_images_per_second": stage1.get("images_per_second"),
                       "device": jax.devices()[0].device_kind},
        "lm": lm_source,
        "timings": timings,
        "command": "python -m experiments train_vlm " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    heldout = captions["heldout"]
    print(f"held-out captions: exact {heldout['exact']:.1%}, attributes {heldout['attribute_accuracy']:.1%} (colour "
          f"{heldout['colour']:.1%}, shape {heldout['shape']:.1%}, count {heldout['count']:.1%})")
    for task in ("colour_word", "shape_word"):
        print(f"{task}: " + ", ".join(f"{k}-shot {v:.1%}" for k, v in few_shot[task].items()))
    print(f"text-only loss: LM {lm_loss:.4f}, gate zero {gate_zero_loss:.4f} (equal: {lm_loss == gate_zero_loss}), "
          f"after {after_loss:.4f} ({report['text_loss']['relative_change']:+.2%})")
    print(f"stage 2: {stage2['images_per_second'] or 0:.0f} images/s on {report['throughput']['device']}; "
          f"wrote {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
