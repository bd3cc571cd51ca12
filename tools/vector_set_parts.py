"""Move a vector set (llmjax.retrieval.datasets) made on the GPU machine to this one, through the device tool's
return limit (16 MiB a file, 8 files and 64 MiB a call): the base vectors as float16 parts, in several calls.

    # on the device, once per call: parts i*4 .. i*4+3 (and the small files with the first call)
    python tools/vector_set_parts.py split runs/vector_data/stdlib-200000-q1000-k10 $OUT --call 0
    # here, with every call's files in one folder:
    python tools/vector_set_parts.py join PARTS_DIR runs/vector_data/stdlib-200000-q1000-k10

`join` rebuilds the set with float32 vectors from the float16 ones and recomputes the ground truth on them (exact
search, so the truth matches the vectors the indexes see here; float16 rounding can swap near-ties).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

PART_BYTES = 16_000_000  # under the 16 MiB a returned file may hold
PARTS_PER_CALL = 4       # 64 MB a call, under its 64 MiB
SMALL = ("queries.npy", "labels.npz", "meta.json")


def split(folder: Path, out: Path, call: int) -> None:
    base = np.load(folder / "base.npy", mmap_mode="r")
    raw = np.ascontiguousarray(base.astype(np.float16)).tobytes()
    count = -(-len(raw) // PART_BYTES)
    out.mkdir(parents=True, exist_ok=True)
    for part in range(call * PARTS_PER_CALL, min((call + 1) * PARTS_PER_CALL, count)):
        (out / f"base.f16.part{part:02d}").write_bytes(raw[part * PART_BYTES: (part + 1) * PART_BYTES])
    if call == 0:
        for name in SMALL:
            shutil.copyfile(folder / name, out / name)
        (out / "parts.json").write_text(json.dumps({"shape": list(base.shape), "parts": count}))
    print(f"call {call}: parts {call * PARTS_PER_CALL}..{min((call + 1) * PARTS_PER_CALL, count) - 1} of {count} "
          f"({-(-count // PARTS_PER_CALL)} calls in all)")


def join(parts: Path, folder: Path) -> None:
    from llmjax.retrieval.datasets import RARE, COMMON, VectorSet, ground_truth, save_vector_set, truth_key

    info = json.loads((parts / "parts.json").read_text())
    missing = [p for p in range(info["parts"]) if not (parts / f"base.f16.part{p:02d}").is_file()]
    if missing:
        sys.exit(f"join: parts {missing} are missing from {parts}")
    raw = b"".join((parts / f"base.f16.part{p:02d}").read_bytes() for p in range(info["parts"]))
    base = np.frombuffer(raw, np.float16).reshape(info["shape"]).astype(np.float32)
    queries = np.load(parts / "queries.npy").astype(np.float32)
    meta = json.loads((parts / "meta.json").read_text())
    with np.load(parts / "labels.npz") as labels:
        offsets, values = labels["offsets"], labels["values"]
    k = int(meta.get("k", 10))
    truth = ground_truth(base, queries, k, meta.get("metric", "cosine"), label_offsets=offsets, label_values=values,
                         filters=(None, RARE, COMMON))
    meta["note_transfer"] = "base vectors carried as float16 and widened; ground truth recomputed on them"
    save_vector_set(folder, VectorSet(base, queries, offsets, values, {truth_key(f): t for f, t in truth.items()},
                                      meta))
    print(f"joined {info['parts']} parts into {folder}: base {base.shape}, queries {queries.shape}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="write one call's parts of FOLDER's base vectors (float16) into OUT")
    s.add_argument("folder", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--call", type=int, default=0, help="which call: parts CALL*4 .. CALL*4+3 (0 adds the small files)")
    j = sub.add_parser("join", help="rebuild the set from PARTS (every call's files) into FOLDER")
    j.add_argument("parts", type=Path)
    j.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    split(args.folder, args.out, args.call) if args.command == "split" else join(args.parts, args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
