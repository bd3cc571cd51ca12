"""The curation pipeline: read -> exact dedup -> MinHash-LSH dedup -> quality rules -> classifier -> PII masking.

Each stage reads the previous stage's JSONL file in OUT/work/ and writes its own
(`{"id", "source", "text"}` per line), with a state file beside it:
- read, exact and minhash need a global pass: each writes a partial file and renames it when
  complete (a killed stage reruns from its start; MinHash signatures are computed in worker
  processes, LSH and clustering in the parent);
- quality, classifier and pii are per document: batches go to worker processes, and after each batch the
  output is flushed and the state file records (documents read, output bytes); a resumed stage
  truncates its output to that size and skips those documents, so a killed-and-resumed run
  writes the same bytes as an uninterrupted one.
Every stage counts documents in / removed (by reason) / out into the report.

Bad input is counted, never fatal: invalid UTF-8 (replaced by U+FFFD), empty documents
(removed), JSONL lines that are not JSON or lack the text field (skipped, line numbers kept).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from llmjax.data.corpus import (CorpusFile, decode_utf8, default_corpus, file_documents, replace_lone_surrogates,
                                resolve_corpus)
from llmjax.data.curate import classifier, dedup, minhash, pii, quality

STAGES = ("exact", "minhash", "quality", "classifier", "pii")
DEFAULT_STAGES = ("exact", "minhash", "quality", "pii")  # the classifier (trained on English prose) would drop code
PER_DOCUMENT_STAGES = ("quality", "classifier", "pii")
MAX_BAD_LINES = 100  # line numbers kept in the report per kind


class CurationError(ValueError):
    """Bad pipeline options or input that cannot be read at all."""


class StoppedEarly(Exception):
    """Raised when stop_after documents were processed (to test resuming)."""


@dataclass(frozen=True)
class CurateConfig:
    stages: tuple[str, ...] = DEFAULT_STAGES
    workers: int = 1
    # None, "line" or "paragraph": also drop units seen before, within the exact stage. Off by default: the default
    # corpus is code, where removing a repeated paragraph (a common method body) breaks the file; on for web text.
    line_dedup: str | None = None
    minhash: minhash.MinHashConfig = field(default_factory=minhash.MinHashConfig)
    thresholds: quality.QualityThresholds = field(default_factory=quality.QualityThresholds)
    classifier_path: str | None = None  # a saved QualityClassifier (.npz), for the classifier stage
    classifier_threshold: float | None = None  # None: the threshold saved with the classifier
    text_field: str = "text"
    batch_documents: int = 64
    progress: bool = False

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise CurationError(f"--stages: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
        if self.workers < 1:
            raise CurationError(f"--workers must be at least 1, got {self.workers}")
        if self.line_dedup not in (None, "line", "paragraph"):
            raise CurationError(f"--line-dedup must be none, line or paragraph, not {self.line_dedup!r}")
        if "classifier" in self.stages and not self.classifier_path:
            raise CurationError("the classifier stage needs --classifier PATH (a missing PATH is trained and saved)")
        if self.batch_documents < 1:
            raise CurationError(f"batch_documents must be at least 1, got {self.batch_documents}")


# --- reading --------------------------------------------------------------------------------------


def input_files(data: str) -> list[CorpusFile]:
    """'stdlib' = the default corpus; otherwise files / folders / globs."""
    return default_corpus() if data == "stdlib" else resolve_corpus(data)


def tolerant_jsonl(corpus_file: CorpusFile, text_field: str, bad: dict) -> Iterator[tuple[str, str, int]]:
    """(source, text, replaced) per good line; bad lines are recorded in bad[kind] as "path:line"."""
    with open(corpus_file.path, "rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            line, replaced = decode_utf8(raw)
            where = f"{corpus_file.path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.setdefault("not_json", []).append(where)
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                bad.setdefault(f"no_{text_field}_string", []).append(where)
                continue
            text, surrogates = replace_lone_surrogates(text)
            yield where, text, replaced + surrogates


def read_documents(data: str, text_field: str, bad: dict) -> Iterator[tuple[str, str, int]]:
    for corpus_file in input_files(data):
        if corpus_file.path.name.endswith(".jsonl"):
            yield from tolerant_jsonl(corpus_file, text_field, bad)
        else:
            for document in file_documents(corpus_file, text_field):
                yield document.source, document.text, document.replaced


# --- files and state ------------------------------------------------------------------------------


def write_json_atomically(path: Path, data) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1))
    os.replace(partial, path)


def read_records(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)


def record_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def stage_paths(work: Path, position: int, name: str) -> tuple[Path, Path]:
    return work / f"{position:02d}_{name}.jsonl", work / f"{position:02d}_{name}.state.json"


def load_state(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


# --- stages ---------------------------------------------------------------------------------------


def stage_report(name: str, documents_in: int, removed: Counter, extra: dict | None = None) -> dict:
    removed_total = sum(removed.values())
    report = {"stage": name, "documents_in": documents_in, "removed": removed_total,
              "documents_out": documents_in - removed_total, "removed_by_reason": dict(removed)}
    report.update(extra or {})
    return report


def run_read(data: str, config: CurateConfig, output: Path) -> dict:
    bad: dict = {}
    removed, replaced_documents, replaced_sequences, documents = Counter(), 0, 0, 0
    partial = output.with_name(output.name + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        for source, text, replaced in tqdm(read_documents(data, config.text_field, bad), desc="read",
                                           disable=not config.progress, unit="doc"):
            documents += 1
            if replaced:
                replaced_documents += 1
                replaced_sequences += replaced
            if not text.strip():
                removed["empty"] += 1
                continue
            out.write(record_line({"id": documents - 1, "source": source, "text": text}))
    os.replace(partial, output)
    bad_counts = {kind: len(lines) for kind, lines in bad.items()}
    return stage_report("read", documents, removed, {
        "invalid_utf8_documents": replaced_documents, "invalid_utf8_sequences_replaced": replaced_sequences,
        "skipped_lines": bad_counts, "skipped_line_numbers": {k: v[:MAX_BAD_LINES] for k, v in bad.items()}})


def run_exact(source: Path, config: CurateConfig, output: Path) -> dict:
    seen_documents, seen_units = set(), set()
    removed, documents, units_removed = Counter(), 0, 0
    partial = output.with_name(output.name + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        for record in tqdm(read_records(source), desc="exact", disable=not config.progress, unit="doc"):
            documents += 1
            if not dedup.first_occurrences([record["text"]], seen_documents)[0]:
                removed["duplicate_document"] += 1
                continue
            if config.line_dedup:
                text, dropped = dedup.dedup_units(record["text"], seen_units, config.line_dedup)
                units_removed += dropped
                if not text.strip():
                    removed[f"all_{config.line_dedup}s_duplicate"] += 1
                    continue
                record = {**record, "text": text}
            out.write(record_line(record))
    os.replace(partial, output)
    return stage_report("exact", documents, removed, {f"{config.line_dedup or 'line'}s_removed": units_removed})


def run_minhash(source: Path, config: CurateConfig, output: Path) -> dict:
    records = list(read_records(source))
    signature_array = minhash.parallel_signatures([r["text"] for r in records], config.minhash, config.workers)
    pairs = minhash.near_duplicate_pairs(signature_array, config.minhash, [r["text"] for r in records])
    keep = minhash.keep_mask(len(records), pairs)
    partial = output.with_name(output.name + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        for record, kept in zip(records, keep.tolist()):
            if kept:
                out.write(record_line(record))
    os.replace(partial, output)
    bands, rows = config.minhash.band_layout
    return stage_report("minhash", len(records), Counter({"near_duplicate": int((~keep).sum())}),
                        {"near_duplicate_pairs": int(len(pairs)), "bands": bands, "rows": rows,
                         "num_perm": config.minhash.num_perm, "threshold": config.minhash.threshold,
                         "verify": config.minhash.verify})


def quality_step(record: dict, thresholds: quality.QualityThresholds) -> tuple[dict | None, list[str], dict]:
    failed = quality.failed_rules(record["text"], thresholds)
    return (None if failed else record), failed, {}


def pii_step(record: dict, settings=None) -> tuple[dict | None, list[str], dict]:
    text, counts = pii.mask_pii(record["text"])
    return {**record, "text": text}, [], counts


_CLASSIFIERS: dict[tuple, classifier.QualityClassifier] = {}


def classifier_step(record: dict, settings: tuple[str, float | None]) -> tuple[dict | None, list[str], dict]:
    """settings: (classifier path, threshold or None); the classifier is loaded once per process."""
    if settings not in _CLASSIFIERS:
        _CLASSIFIERS[settings] = classifier.load_classifier(settings[0])
    model = _CLASSIFIERS[settings]
    threshold = model.threshold if settings[1] is None else settings[1]
    keep = model.probabilities([record["text"]])[0] >= threshold
    return (record if keep else None), ([] if keep else ["low_quality_score"]), {}


STEPS = {"quality": quality_step, "classifier": classifier_step, "pii": pii_step}


def step_settings(name: str, config: CurateConfig):
    if name == "quality":
        return config.thresholds
    if name == "classifier":
        return (str(config.classifier_path), config.classifier_threshold)
    return None


def _apply_step(arguments):
    name, record, settings = arguments
    return STEPS[name](record, settings)


def run_per_document(name: str, source: Path, config: CurateConfig, output: Path, state_path: Path,
                     stop_after: int | None, pool) -> dict:
    """A per-document stage in batches (in `pool` when given); resumable after every batch."""
    state = load_state(state_path) or {"done": False, "documents": 0, "bytes": 0, "removed": {}, "masked": {},
                                       "failed_rules": {}}
    removed, masked, failed_rules = Counter(state["removed"]), Counter(state["masked"]), Counter(state["failed_rules"])
    with open(output, "ab") as out:
        out.truncate(state["bytes"])
    records = read_records(source)
    for _ in range(state["documents"]):
        next(records)
    documents = state["documents"]
    bar = tqdm(desc=name, initial=documents, disable=not config.progress, unit="doc")
    with bar, open(output, "a", encoding="utf-8") as out:
        while True:
            batch = [record for _, record in zip(range(config.batch_documents), records)]
            if not batch:
                break
            settings = step_settings(name, config)
            work = [(name, record, settings) for record in batch]
            results = pool.map(_apply_step, work) if pool is not None else list(map(_apply_step, work))
            for kept, failed, counts in results:
                if kept is None:
                    removed[failed[0] if failed else "removed"] += 1
                    failed_rules.update(failed)
                else:
                    out.write(record_line(kept))
                masked.update(counts)
            documents += len(batch)
            bar.update(len(batch))
            out.flush()
            state = {"done": False, "documents": documents, "bytes": out.tell(), "removed": dict(removed),
                     "masked": dict(masked), "failed_rules": dict(failed_rules)}
            write_json_atomically(state_path, state)
            if stop_after is not None and documents >= stop_after:
                raise StoppedEarly(f"{name}: stopped after {documents} documents")
    extra = {"failed_rules": dict(failed_rules)} if name == "quality" else {"masked": dict(masked)} if name == "pii" \
        else {}
    return stage_report(name, documents, removed, extra)


# --- the pipeline ---------------------------------------------------------------------------------


def curate(data: str, out: str | Path, config: CurateConfig = CurateConfig(), stop_after: int | None = None) -> dict:
    """Run (or resume) the pipeline into OUT/work/; returns {"stages": [...], "output": last work file}.

    stop_after: raise StoppedEarly once a per-document stage has processed that many documents
    (a stand-in for a killed run, to test resuming)."""
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    names = ["read", *[s for s in STAGES if s in config.stages]]
    reports, previous = [], None
    pool = None
    try:
        for position, name in enumerate(names):
            output, state_path = stage_paths(work, position, name)
            state = load_state(state_path)
            if state is not None and state.get("done"):
                reports.append(state["report"])
                previous = output
                continue
            if name in PER_DOCUMENT_STAGES:
                if pool is None and config.workers > 1:
                    pool = multiprocessing.get_context("forkserver").Pool(config.workers)
                report = run_per_document(name, previous, config, output, state_path, stop_after, pool)
            elif name == "read":
                report = run_read(data, config, output)
            elif name == "exact":
                report = run_exact(previous, config, output)
            else:
                report = run_minhash(previous, config, output)
            write_json_atomically(state_path, {"done": True, "report": report})
            reports.append(report)
            previous = output
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return {"stages": reports, "output": str(previous)}


def curated_texts(path: str | Path) -> Iterator[str]:
    for record in read_records(Path(path)):
        yield record["text"]


def removal_counts(reports: list[dict]) -> dict[str, int]:
    """{"stage: reason": documents removed} over all stages, for the bar chart."""
    return {f"{r['stage']}: {reason}": count for r in reports for reason, count in r["removed_by_reason"].items()
            if count}

