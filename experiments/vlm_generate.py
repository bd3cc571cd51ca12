"""Generate text about images with a VLM run of `experiments train_vlm` (KV cache; visual latents computed once).

    python -m experiments vlm_generate --run runs/vlm --image a.png --prompt "<image>Caption:"
    python -m experiments vlm_generate --run runs/vlm --image a.png --image b.png \\
        --prompt "<image>Word: dax<|endofchunk|><image>Word:"

One --image per <image> marker in the prompt, in order. Images are PNG / JPEG / ... files read with Pillow; one that
is not RGB or not the tower's size is an error naming the mismatch, unless --adapt-images (then it is converted
and resized, nearest neighbour, with a note on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments vlm_generate",
                                description="Generate text after a prompt holding <image> markers, one --image per "
                                "marker, with a run folder written by `python -m experiments train_vlm`.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run folder of `experiments train_vlm`")
    p.add_argument("--image", type=Path, action="append", default=[], help="an image file (repeat, in prompt order)")
    p.add_argument("--prompt", required=True, help="text with one <image> marker per --image, e.g. '<image>Caption:'")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapt-images", action="store_true",
                   help="convert non-RGB images and resize others to the tower's size (nearest) instead of refusing")
    p.add_argument("--no-eos", action="store_true", help="do not stop at <|endoftext|>")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.temperature < 0:
        p.error(f"--temperature {args.temperature}: must be >= 0")
    return args


def load_run(run: Path):
    """(params, FlamingoConfig, tokenizer) of a train_vlm run folder; SystemExit with one line when it is not one."""
    from llmjax.model.flamingo import flamingo_config_from_dict
    from llmjax.tokenizer import TokenizerError, load_tokenizer
    from llmjax.train.checkpoint import restore

    if not (run / "config.json").is_file() or not (run / "checkpoint").is_dir():
        raise SystemExit(f"{run}: not a train_vlm run folder (it needs config.json and checkpoint/)")
    try:
        cfg = flamingo_config_from_dict(json.loads((run / "config.json").read_text())["flamingo"])
        tokenizer = load_tokenizer(run / "tokenizer.json")
    except (KeyError, ValueError, TypeError, TokenizerError) as error:
        raise SystemExit(f"{run}: unreadable run files ({error})") from None
    return restore(run / "checkpoint"), cfg, tokenizer


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from llmjax.data.images import ImageDataError, interleaved_segments, load_image
    from llmjax.infer.generate import GenerationError
    from llmjax.infer.vlm import vlm_generate
    from llmjax.model.flamingo import FlamingoInputError

    params, cfg, tokenizer = load_run(args.run)
    images = []
    try:
        for path in args.image:
            image, notes = load_image(path, cfg.vision.image_size, adapt=args.adapt_images)
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            images.append(image)
        interleaved_segments(args.prompt, images)  # markers and images pair up, or one clear error
        prompt = tokenizer.encode(args.prompt)
        out = vlm_generate(params, cfg, [prompt], [images], max_new_tokens=args.max_new_tokens,
                           eos_id=None if args.no_eos else tokenizer.eot_id, temperature=args.temperature,
                           seed=args.seed)
    except (ImageDataError, GenerationError, FlamingoInputError) as error:
        raise SystemExit(f"error: {error}") from None
    ids = [t for t in out.tokens[0] if args.no_eos or t != tokenizer.eot_id]
    print(tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
