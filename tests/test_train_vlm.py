"""train_vlm --quick end to end (run folder, report, the gate-zero text loss equal to the LM's), then vlm_generate on
its run: a caption from a PNG, and one clear error for an undecodable image, the wrong channels, the wrong size and
markers that do not pair with the images."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from llmjax.data.images import ImageDataConfig, example_for, save_png
from llmjax.experiments import train_vlm, vlm_generate
from llmjax.infer.vlm import vlm_generate as generate_api


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_run_folder):
    """A quick run on a given LM (a random gpt2-tiny run folder with the byte tokenizer: stage 0's training is the
    trainer's, tested elsewhere), so the test compiles the CLIP stage, the VLM stage and generation only."""
    import jax

    from llmjax.config import get_config
    from llmjax.model import init_params
    from llmjax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("bytes")
    cfg = get_config("gpt2-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=96)
    lm = make_run_folder(tmp_path_factory.mktemp("lm") / "lm", cfg, init_params(cfg, jax.random.key(0)), tokenizer)
    out = tmp_path_factory.mktemp("vlm") / "run"
    assert train_vlm.main(["--quick", "--out", str(out), "--lm-ckpt", str(lm), "--vlm-recolour", "0.5"]) == 0
    return out


def test_cell_pooling_and_targets_match_the_pixels():
    """Each grid cell's pooled patches hold its object's colour (and no other object's), and the targets say which:
    the per-cell loss of stage 1 is supervised by what the pixels show."""
    from llmjax.data.images import PALETTE, SHAPES

    config = ImageDataConfig(size=60, grid=3, max_objects=5)  # cells of 20 pixels: 2 x 2 patches of 10
    vcfg = train_vlm.scratch_vision_config(argparse.Namespace(vision_preset="vit-tiny", vision_width=0,
                                                              vision_layers=0, image_size=60, patch_size=10))
    pooling = train_vlm.cell_pooling(vcfg, config.grid)  # [1 + 36, 9]
    assert pooling.shape == (1 + 36, 9) and np.all(pooling[0] == 0)
    np.testing.assert_allclose(pooling.sum(0), 1.0)
    assert np.all((pooling[1:] > 0).sum(1) == 1)  # every patch in exactly one cell
    examples = [example_for(3, "train", i, config) for i in range(6)]
    colour, shape = train_vlm.cell_targets([record for _, record in examples], config.grid)
    for (image, record), colours, shapes in zip(examples, colour, shape):
        patches = image.reshape(6, 10, 6, 10, 3).transpose(0, 2, 1, 3, 4).reshape(36, 100, 3)
        for cell in range(9):
            pixels = {tuple(p) for p in patches[pooling[1:, cell] > 0].reshape(-1, 3)}
            present = [name for name, rgb in PALETTE.items() if rgb in pixels]
            assert present == ([list(PALETTE)[colours[cell] - 1]] if colours[cell] else []), (record, cell)
            assert (shapes[cell] == 0) == (colours[cell] == 0) and shapes[cell] <= len(SHAPES)
        assert sorted(SHAPES[s - 1] for s in shapes if s) == sorted(o["shape"] for o in record["labels"]["objects"])


@pytest.mark.slow  # with the tests below, about a minute of CPU compiling (CLIP, VLM step, generation)
def test_quick_run_writes_the_run_folder_and_report(run):
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "report.json", "checkpoint"):
        assert (run / name).exists(), name
    report = json.loads((run / "report.json").read_text())
    text = report["text_loss"]
    assert text["gate_zero_equal"] and text["lm"] == text["gate_zero"] and np.isfinite(text["after"])
    assert text["after"] == text["lm"]  # text that sees no image skips the gated blocks: unchanged by training
    assert set(report["stage1"]["validation_cell_accuracy"]) == {"colour", "shape"}
    for split in ("heldout", "validation"):
        scores = report["captions"][split]
        assert set(scores) >= {"exact", "colour", "shape", "count", "attribute_accuracy", "images"}
        assert all(0 <= scores[k] <= 1 for k in ("exact", "colour", "shape", "count"))
    assert set(report["few_shot"]["colour_word"]) == {"0", "2"}
    assert report["stage2"]["images_per_second"] > 0 and report["stage1"]["images_per_second"] > 0
    stages = {json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"clip", "vlm"}


def test_vision_from_an_earlier_run_reuses_its_tower(run, tmp_path):
    """--vision-from RUN: the run's stage-1 tower (the same arrays, its config, its stage-1 stats), no stage 1; one
    clear error for another image size, a missing folder, or both tower flags."""
    import jax

    from llmjax.train.checkpoint import restore

    args = train_vlm.parse_args(["--quick", "--vision-from", str(run)])
    params, vcfg, stats = train_vlm.vision_tower(args, None, None, None, None)
    saved = restore(run / "checkpoint")["vision"]
    assert jax.tree.structure(params) == jax.tree.structure(saved)
    for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    report = json.loads((run / "report.json").read_text())
    assert vcfg.image_size == 40 and stats["from_run"] == str(run)
    assert stats["validation_cell_accuracy"] == report["stage1"]["validation_cell_accuracy"]
    with pytest.raises(SystemExit, match="pass --image-size 40"):
        train_vlm.vision_tower(train_vlm.parse_args(["--quick", "--vision-from", str(run), "--image-size", "48"]),
                               None, None, None, None)
    for argv in (["--vision-from", str(tmp_path / "none")], ["--vision-from", str(run), "--vision-tower", str(run)]):
        with pytest.raises(SystemExit):
            train_vlm.parse_args(argv)


def test_vlm_generate_captions_a_png(run, tmp_path, capsys):
    image, _ = example_for(0, "heldout", 0, ImageDataConfig(size=40, grid=2, max_objects=2))
    save_png(image, tmp_path / "a.png")
    assert vlm_generate.main(["--run", str(run), "--image", str(tmp_path / "a.png"), "--prompt", "<image>Caption:",
                              "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    params, cfg, tokenizer = vlm_generate.load_run(run)  # the same greedy tokens through the library
    out = generate_api(params, cfg, [tokenizer.encode("<image>Caption:")], [[image]], max_new_tokens=4,
                       eos_id=tokenizer.eot_id)
    assert printed == tokenizer.decode([t for t in out.tokens[0] if t != tokenizer.eot_id]) + "\n"


def test_vlm_generate_bad_input_is_one_clear_error(run, tmp_path, capsys):
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((40, 40, 4), np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "big.png")
    save_png(np.zeros((40, 40, 3), np.uint8), tmp_path / "ok.png")
    base = ["--run", str(run), "--max-new-tokens", "2"]
    cases = [(["--image", str(tmp_path / "junk.png"), "--prompt", "<image>Caption:"], "not a decodable image"),
             (["--image", str(tmp_path / "rgba.png"), "--prompt", "<image>Caption:"], "4 channel"),
             (["--image", str(tmp_path / "big.png"), "--prompt", "<image>Caption:"], "50x50 pixels, expected 40x40"),
             (["--image", str(tmp_path / "ok.png"), "--prompt", "<image>a<image>b"], "2 <image> marker.*1 image"),
             (["--image", str(tmp_path / "ok.png"), "--image", str(tmp_path / "ok.png"), "--prompt", "<image>a"],
              "1 <image> marker.*2 image"),
             (["--prompt", "x"] + ["--run", str(tmp_path)], "not a train_vlm run folder")]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            vlm_generate.main(base + extra)
    # --adapt-images converts and resizes, with a note
    assert vlm_generate.main(base + ["--adapt-images", "--image", str(tmp_path / "rgba.png"), "--prompt",
                                     "<image>Caption:"]) == 0
    assert "converted from mode RGBA" in capsys.readouterr().err


def test_bad_flags_are_one_line():
    with pytest.raises(SystemExit):
        train_vlm.parse_args(["--shots", "0,x"])
    with pytest.raises(SystemExit):
        train_vlm.parse_args(["--shots", "0,9"])
    with pytest.raises(SystemExit):
        train_vlm.parse_args(["--caption-fraction", "2"])
    with pytest.raises(SystemExit):
        train_vlm.parse_args(["--clip-cell-weight", "-1"])
    with pytest.raises(SystemExit):
        train_vlm.parse_args(["--colour-swap", "1.5"])
    with pytest.raises(SystemExit):
        train_vlm.parse_args(["--clip-recolour", "-0.1"])
    with pytest.raises(SystemExit):
        train_vlm.parse_args(["--vlm-recolour", "2"])


def test_colour_swap_replaces_colour_words_only_and_leaves_them_unscored():
    from llmjax.data.images import PALETTE

    caption = "an orange diamond, two red circles and a blue square"
    rng = np.random.default_rng(0)
    assert train_vlm.caption_segments(caption, rng, 0.0) == [(f" {caption}", True)]
    segments = train_vlm.caption_segments(caption, rng, 1.0)
    words = caption.split(" ")
    assert "".join(text for text, _ in segments).split(" ")[1:] != words
    swapped = [text.strip() for text, scored in segments if not scored]
    original = [w for w in words if w in PALETTE]
    assert len(swapped) == 3 and all(s in PALETTE and s != o for s, o in zip(swapped, original))
    kept = "".join(text if scored else " COLOUR" for text, scored in segments)
    assert kept == " " + " ".join("COLOUR" if w in PALETTE else w for w in words)
    rates = [len([1 for _, scored in train_vlm.caption_segments(caption, rng, 0.5) if not scored])
             for _ in range(300)]
    assert 1.2 < np.mean(rates) < 1.8  # half of the 3 colour words


def test_recoloured_images_keep_every_shape_and_show_no_palette_colour():
    from llmjax.data.images import PALETTE

    config = ImageDataConfig(size=48, grid=2, max_objects=3)
    images = np.stack([example_for(1, "train", i, config)[0] for i in range(8)])
    table = train_vlm.off_palette_colours(np.random.default_rng(0), len(images) * len(PALETTE))
    out = np.asarray(train_vlm.recoloured(images, table.reshape(len(images), len(PALETTE), 3)))
    assert out.dtype == np.uint8 and out.shape == images.shape
    palette = np.array(list(PALETTE.values()), np.float32)
    was_palette = np.any(np.all(images[..., None, :] == palette.astype(np.uint8), axis=-1), axis=-1)
    np.testing.assert_array_equal(out[~was_palette], images[~was_palette])  # background and digits as drawn
    distances = np.linalg.norm(out[was_palette][:, None, :].astype(np.float32) - palette, axis=-1)
    assert was_palette.any() and distances.min() >= train_vlm.OFF_PALETTE_DISTANCE
    for image, original in zip(out, images):  # one colour per palette colour an image uses
        for rgb in PALETTE.values():
            assert len(np.unique(image[np.all(original == np.array(rgb, np.uint8), axis=-1)], axis=0)) <= 1


def test_recoloured_caption_rows_score_no_colour_word_and_are_recoloured_in_the_step():
    """--vlm-recolour: a recoloured row is a caption row whose colour words are all swapped and unscored; the step's
    images recolour exactly those rows' first image (QA rows, other rows and episodes as drawn)."""
    from llmjax.data.images import PALETTE
    from llmjax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("bytes")
    args = train_vlm.parse_args(["--quick", "--vlm-recolour", "0.5", "--caption-fraction", "0.7", "--batch", "24"])
    pool = train_vlm.draw_pool(args, "train", 40, 0)
    batch = train_vlm.training_batch(pool, np.random.default_rng(1), args, tokenizer)
    recolour, tables = batch["recolour"], batch["tables"]
    assert recolour.shape == (24,) and tables.shape == (24, len(PALETTE), 3) and 0 < recolour.sum() < 24
    assert len(batch["tokens"]) == 24 + args.episode_batch
    shown = np.asarray(train_vlm.shown_images(batch))
    for row in range(len(batch["tokens"])):
        text = tokenizer.decode(batch["tokens"][row][batch["tokens"][row] > 0].tolist())
        scored = tokenizer.decode(batch["tokens"][row][1:][batch["mask"][row]].tolist())
        if row < 24 and recolour[row]:
            assert "Caption:" in text and not any(colour in scored for colour in PALETTE), scored
            changed = np.any(shown[row, 0] != batch["images"][row, 0], axis=-1)
            assert changed.any() and np.all(np.isin(shown[row, 0][changed], tables[row]))
        else:
            np.testing.assert_array_equal(shown[row], batch["images"][row])
    plain = train_vlm.parse_args(["--quick", "--vlm-recolour", "0"])
    assert "tables" not in train_vlm.training_batch(pool, np.random.default_rng(1), plain, tokenizer)


def test_cell_probe_scores_every_cell_and_the_held_out_pairs_apart():
    """Logits that name every cell's colour and shape score 1; one held-out pair's cell given a wrong shape lowers
    the held-out pairs' shape accuracy by one cell in their count, and the all-cell figure by one in all."""
    from llmjax.data.images import HELD_OUT_PAIRS, PALETTE, SHAPES

    config = ImageDataConfig(size=48, grid=2, max_objects=3)
    records = [example_for(2, "heldout", i, config)[1] for i in range(10)]
    colour, shape = train_vlm.cell_targets(records, config.grid)  # [images, cells]
    colour_logits, shape_logits = np.eye(1 + len(PALETTE))[colour], np.eye(1 + len(SHAPES))[shape]
    perfect = train_vlm.cell_probe(records, colour_logits, shape_logits, config.grid)
    pairs = [(list(PALETTE)[c - 1], SHAPES[s - 1]) in HELD_OUT_PAIRS if c else False
             for c, s in zip(colour.ravel(), shape.ravel())]
    assert perfect == {"colour": 1.0, "shape": 1.0, "heldout_pair_colour": 1.0, "heldout_pair_shape": 1.0,
                       "heldout_pair_cells": sum(pairs)}
    image, cell = divmod(pairs.index(True), colour.shape[1])
    shape_logits[image, cell] = np.eye(1 + len(SHAPES))[0]  # that object called "empty"
    probe = train_vlm.cell_probe(records, colour_logits, shape_logits, config.grid)
    assert probe["heldout_pair_shape"] == pytest.approx(1 - 1 / sum(pairs))
    assert probe["shape"] == pytest.approx(1 - 1 / colour.size) and probe["heldout_pair_colour"] == 1.0
