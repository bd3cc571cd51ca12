"""Make images with known content (coloured shapes, digits): captions, QA, unseen-combination split, episodes.

Nothing is downloaded: scenes are drawn by llmjax.data.images in exact palette colours, so every label can be
checked from the pixels. For each split in --splits writes OUT/SPLIT/ (manifest.json, records.jsonl with caption,
question-answer pairs and labels per image, and images.npz or images/*.png); with --episodes N also
OUT/episodes-SPLIT/ (N few-shot episodes of --task). Then OUT/report.json (settings, objects per (colour, shape)
pair per split, the held-out pairs, images/s), OUT/preview.png (the first images of each split, captioned) and,
with --episodes, OUT/episodes.png (the first episode of the first split).

Splits: train and validation never show a held-out (colour, shape) pair; every heldout image shows at least one.

    python -m experiments make_images --out runs/images --count 1000
    python -m experiments make_images --out runs/images --count 20000 --digits 0.3 --episodes 2000 --shots 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from llmjax.data import images

PROG = "python -m experiments make_images"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (one subfolder per split)")
    parser.add_argument("--count", type=int, default=1000, help="images per split (default: 1000)")
    parser.add_argument("--splits", default=",".join(images.SPLITS),
                        help=f"comma-separated splits among {','.join(images.SPLITS)} (default: all three)")
    parser.add_argument("--seed", type=int, default=0,
                        help="image i of a split depends only on (seed, split, i) (default: 0)")
    parser.add_argument("--size", type=int, default=64,
                        help=f"image side in pixels, at least {images.MIN_CELL_PIXELS} per grid cell (default: 64)")
    parser.add_argument("--grid", type=int, default=3,
                        help=f"objects sit one per cell of a grid x grid layout, 1..{images.MAX_GRID} (default: 3)")
    parser.add_argument("--min-objects", type=int, default=1, help="fewest objects per image (default: 1)")
    parser.add_argument("--max-objects", type=int, default=4,
                        help="most objects per image, at most grid * grid (default: 4)")
    parser.add_argument("--digits", type=float, default=0.0,
                        help="probability that an object carries a white digit 0-9 (default: 0)")
    parser.add_argument("--questions", type=int, default=4,
                        help="question-answer pairs per image (default: 4)")
    parser.add_argument("--format", choices=("npz", "png"), default="npz",
                        help="npz: one images.npz array per split (fast); png: images/NNNNNN.png (default: npz)")
    parser.add_argument("--episodes", type=int, default=0,
                        help="few-shot episodes per split, written to OUT/episodes-SPLIT (default: 0: none)")
    parser.add_argument("--task", choices=images.TASKS, default="colour_word",
                        help="episode task: caption, qa, or colour_word / shape_word (a new word per colour / shape "
                        "in every episode, learnable only from its examples) (default: colour_word)")
    parser.add_argument("--shots", type=int, default=4, help="(image, text) examples before the query (default: 4)")
    parser.add_argument("--ways", type=int, default=2,
                        help="classes (colours or shapes) per colour_word / shape_word episode (default: 2)")
    parser.add_argument("--preview", type=int, default=8,
                        help="images per split in OUT/preview.png (default: 8; 0: no preview)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes drawing images (any number gives the same images; default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def check_args(args) -> tuple[list[str], images.ImageDataConfig]:
    """The splits and the config, or an ImageDataError naming the flag."""
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits:
        raise images.ImageDataError("--splits is empty: give one or more of " + ",".join(images.SPLITS))
    for split in splits:
        if split not in images.SPLITS:
            raise images.ImageDataError(f"--splits: unknown split {split!r}; choose among {','.join(images.SPLITS)}")
    for flag, value, low in (("--count", args.count, 1), ("--seed", args.seed, 0), ("--episodes", args.episodes, 0),
                             ("--shots", args.shots, 0), ("--ways", args.ways, 1), ("--preview", args.preview, 0),
                             ("--workers", args.workers, 1),
                             ("--questions", args.questions, 0), ("--size", args.size, 1), ("--grid", args.grid, 1),
                             ("--min-objects", args.min_objects, 1), ("--max-objects", args.max_objects, 1)):
        if value < low:
            raise images.ImageDataError(f"{flag}={value}: must be >= {low}")
    if args.grid > images.MAX_GRID:
        raise images.ImageDataError(f"--grid={args.grid}: must be at most {images.MAX_GRID}")
    if args.max_objects > args.grid ** 2:
        raise images.ImageDataError(f"--max-objects={args.max_objects} cannot fit a {args.grid}x{args.grid} grid "
                                    f"(one object per cell: at most {args.grid ** 2}); raise --grid or lower it")
    if args.min_objects > args.max_objects:
        raise images.ImageDataError(f"--min-objects={args.min_objects} exceeds --max-objects={args.max_objects}")
    if not 0 <= args.digits <= 1:
        raise images.ImageDataError(f"--digits={args.digits}: a probability in [0, 1]")
    images.check_size(args.size, args.grid, name="--size")
    config = images.ImageDataConfig(size=args.size, grid=args.grid, min_objects=args.min_objects,
                                    max_objects=args.max_objects, digit_probability=args.digits,
                                    questions_per_image=args.questions)
    return splits, config


def plot_preview(previews: dict[str, tuple[np.ndarray, list[str]]], path: Path) -> None:
    """One row per split: its first images, each titled with its caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(captions) for _, captions in previews.values())
    figure, axes = plt.subplots(len(previews), columns, figsize=(1.9 * columns, 2.6 * len(previews)), squeeze=False)
    for row, (split, (pixels, captions)) in enumerate(previews.items()):
        for column in range(columns):
            axis = axes[row][column]
            axis.axis("off")
            if column < len(captions):
                axis.imshow(pixels[column], interpolation="nearest")
                axis.set_title("\n".join(textwrap.wrap(captions[column], 30)[:4]), fontsize=6)
        axes[row][0].text(-0.1, 0.5, split, transform=axes[row][0].transAxes, rotation=90, va="center", ha="right",
                          fontsize=9)
    figure.suptitle("make_images: first images per split (captions as written)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_episode(episode: images.Episode, split: str, path: Path) -> None:
    """One episode as a strip: each image over its text; the query's answer in brackets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(episode.images), figsize=(1.9 * len(episode.images), 2.4), squeeze=False)
    for number, (axis, image, text) in enumerate(zip(axes[0], episode.images, episode.texts)):
        axis.imshow(image, interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        label = text if number < episode.shots else f"{text} [{episode.answer}]"
        axis.set_xlabel("\n".join(textwrap.wrap(label, 28)[:4]), fontsize=6)
    mapping = f"; mapping {episode.mapping}" if episode.mapping else ""
    figure.suptitle(f"{split} episode 0: {episode.task}, {episode.shots} shots, then the query{mapping}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        splits, config = check_args(args)
        if args.episodes:  # a bad --task / --shots / --ways combination fails before anything is written
            images.episode_for(args.seed, splits[0], 0, args.task, args.shots, args.ways, config)
    except images.ImageDataError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]), "seed": args.seed,
              "config": dataclasses.asdict(config), "format": args.format,
              "held_out_pairs": [list(p) for p in images.HELD_OUT_PAIRS], "splits": {}}
    previews = {}
    for split in splits:
        start = time.perf_counter()
        folder = images.write_image_dataset(args.out / split, args.count, args.seed, split, config, args.format,
                                            progress=not args.no_progress, workers=args.workers)
        seconds = time.perf_counter() - start
        dataset = images.read_image_dataset(folder)
        counts = images.pair_counts(dataset.records)
        held_out_shown = sum(counts.get(f"{c} {s}", 0) for c, s in images.HELD_OUT_PAIRS)
        report["splits"][split] = {"folder": str(folder), "images": len(dataset), "seconds": round(seconds, 3),
                                   "images_per_second": round(len(dataset) / seconds, 1),
                                   "objects": sum(r["labels"]["count"] for r in dataset.records),
                                   "held_out_objects": held_out_shown, "objects_per_pair": dict(sorted(counts.items()))}
        if args.episodes:
            episodes = images.write_episodes(args.out / f"episodes-{split}", args.episodes, args.seed, split,
                                             args.task, args.shots, args.ways, config, progress=not args.no_progress)
            report["splits"][split]["episodes"] = {"folder": str(episodes), "count": args.episodes, "task": args.task,
                                                   "shots": args.shots, "ways": args.ways}
            if args.preview and split == splits[0]:
                plot_episode(images.read_episodes(episodes)[0], split, args.out / "episodes.png")
        if args.preview:
            shown = min(args.preview, len(dataset))
            previews[split] = (dataset.images[:shown], [r["caption"] for r in dataset.records[:shown]])
        print(f"{split}: {len(dataset):,} images -> {folder} ({len(dataset) / seconds:,.0f} images/s; "
              f"{held_out_shown:,} objects of held-out pairs)")
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    if previews:
        plot_preview(previews, args.out / "preview.png")
    print(f"held-out (colour, shape) pairs: {', '.join(f'{c} {s}' for c, s in images.HELD_OUT_PAIRS)}")
    written = [args.out / "report.json"] + ([args.out / "preview.png"] if previews else [])
    written += [args.out / "episodes.png"] if (args.out / "episodes.png").exists() and args.episodes else []
    print("-> " + ", ".join(map(str, written)))
    return 0
