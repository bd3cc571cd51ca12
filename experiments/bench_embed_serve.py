"""POST /v1/embeddings under C concurrent clients (sequences/s, p50/p99 latency) against sentence-transformers' encode.

The server (llmjax.infer.server + the embedding batcher, uvicorn in a thread of this process, or --server-workers N
processes on one port as `serve --workers N` runs them) serves all-MiniLM-L6-v2 (or --model PRESET, random weights,
no peer); --client-processes processes share --clients concurrent HTTP clients
(httpx, keep-alive), each sending one request after another, every request --inputs-per-request sequences of exactly
--seq-len tokens ([CLS] + word pieces of the default corpus + [SEP], sent as token ids, or as text with --input text)
and asking for base64 vectors (what the openai client asks for). After --warmup-s the requests completed in the next
--duration-s count: sequences/s, requests/s, latency percentiles. The peer, in the same run on the same device:
sentence-transformers' SentenceTransformer.encode of the same model (torch, CUDA when there) on the same sequences'
text, cut to --seq-len tokens. Prints a table, writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

PROG = "python -m experiments bench_embed_serve"
MODEL_NAME = "embedder"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=" ".join(__doc__.split()),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--hf", default="all-minilm-l6-v2",
                        help="the served model: a Hugging Face sentence-transformers folder, or a packaged name; the "
                             "peer loads the same folder")
    source.add_argument("--model", default=None, help="a preset with random weights instead (no peer)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients, each one request at a time")
    p.add_argument("--client-processes", type=int, default=None,
                   help="processes the clients are spread over (default: min(8, cores / 2), at most --clients)")
    p.add_argument("--inputs-per-request", default="1,16",
                   help="comma-separated: sequences per request, one run each")
    p.add_argument("--seq-len", type=int, default=128, help="tokens of every sequence, [CLS] and [SEP] included")
    p.add_argument("--input", choices=("ids", "text"), default="ids",
                   help="send token ids (no tokenization on the server) or the text (tokenized by the server, "
                        "truncate_prompt_tokens=--seq-len)")
    p.add_argument("--sequences", type=int, default=4096, help="distinct sequences cycled through by the clients")
    p.add_argument("--warmup-s", type=float, default=3.0, help="seconds of load before the measured window")
    p.add_argument("--duration-s", type=float, default=10.0, help="seconds of the measured window, per run")
    p.add_argument("--server-workers", type=int, default=1,
                   help="server processes: 1 runs uvicorn in a thread of this process; N > 1 spawns N processes "
                        "accepting on one port (serve --workers N), each with its own copy of the model on the same "
                        "device (one process tops out at a few thousand requests/s)")
    p.add_argument("--max-batch", type=int, default=256, help="the server's largest batch (sequences)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="the server's batch_wait_s, in ms")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None,
                   help="the served model's compute dtype (default: its own, float32 for MiniLM)")
    p.add_argument("--no-peer", action="store_true", help="skip sentence-transformers")
    p.add_argument("--peer-batch-size", type=int, default=256, help="SentenceTransformer.encode's batch_size")
    p.add_argument("--peer-sequences", type=int, default=None,
                   help="sequences the peer encodes in its timed run (default: 8 x --peer-batch-size)")
    p.add_argument("--quick", action="store_true",
                   help="a CPU smoke run: 4 clients in 1 process, 1 and 4 inputs per request, 32 tokens, 64 "
                        "sequences, 0.3 s warm-up, 1.5 s measured, batches of at most 8, peer batch 16 (flags set to "
                        "other values than their defaults win)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench")) / "bench_embed_serve.json",
                   help="the JSON report (the PNG is written next to it)")
    return p


QUICK = dict(clients=4, client_processes=1, inputs_per_request="1,4", seq_len=32, sequences=64, warmup_s=0.3,
             duration_s=1.5, max_batch=8, peer_batch_size=16)


def parse_args(argv):
    from llmjax.experiments._flags import apply_quick

    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        apply_quick(p, args, QUICK)
    try:
        args.inputs = [int(k) for k in args.inputs_per_request.split(",") if k.strip()]
    except ValueError:
        p.error(f"--inputs-per-request {args.inputs_per_request!r}: expected comma-separated integers")
    for name in ("clients", "seq_len", "sequences", "max_batch", "peer_batch_size", "server_workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be a positive integer")
    if not args.inputs or min(args.inputs) < 1:
        p.error("--inputs-per-request: give positive integers")
    if args.seq_len < 3:
        p.error(f"--seq-len={args.seq_len}: needs room for [CLS], a word piece and [SEP]")
    if args.duration_s <= 0 or args.warmup_s < 0:
        p.error("--duration-s must be > 0 and --warmup-s >= 0")
    processes = args.client_processes or max(1, min(8, (os.cpu_count() or 2) // 2))
    args.client_processes = max(1, min(processes, args.clients))
    if args.model is not None:
        args.hf, args.no_peer = None, True
    return args


# --- the sequences --------------------------------------------------------------------------------------------

def corpus_sequences(tokenizer, seq_len: int, count: int) -> tuple[list[list[int]], list[str]]:
    """`count` sequences of exactly seq_len ids (the tokenizer's framing around disjoint windows of default-corpus
    word pieces) and, for each, text that tokenizes to at least as many word pieces (its window and the next few
    word pieces, decoded), so a peer cutting at seq_len reads the same length."""
    from llmjax.data.corpus import default_corpus, read_text

    framing = tokenizer.special_ids.around([])
    head = framing[:1] if framing and framing[0] == tokenizer.special_ids.bos else []
    tail = framing[len(head):]
    window = seq_len - len(framing)
    sequences, texts = [], []
    for corpus_file in default_corpus():
        tokens = tokenizer.encode_ordinary(read_text(corpus_file.path))
        for start in range(0, len(tokens) - window - 16, window):
            sequences.append([*head, *tokens[start:start + window], *tail])
            texts.append(tokenizer.decode(tokens[start:start + window + 16]))
            if len(sequences) == count:
                return sequences, texts
    raise SystemExit(f"{PROG}: the default corpus gives only {len(sequences)} sequences of {seq_len} tokens")


def request_bodies(sequences, texts, k: int, seq_len: int, kind: str) -> list[bytes]:
    """JSON bodies of k sequences each (the pool cycled), base64 vectors asked for."""
    bodies = []
    for start in range(0, len(sequences), k):
        rows = [(start + j) % len(sequences) for j in range(k)]
        body = {"model": MODEL_NAME, "encoding_format": "base64"}
        if kind == "ids":
            body["input"] = [sequences[r] for r in rows]
        else:
            body |= {"input": [texts[r] for r in rows], "truncate_prompt_tokens": seq_len}
        bodies.append(json.dumps(body).encode())
    return bodies


# --- the clients (in child processes) ----------------------------------------------------------------------------

def client_process(url: str, runs: list[tuple[int, list[bytes]]], clients: int, offset: int, warmup_s: float,
                   duration_s: float, barrier, results) -> None:
    """`clients` concurrent clients in this process, for each (inputs per request, request bodies) of `runs` in
    turn: all processes start a run together (the barrier), then this one puts {"latencies", "sequences", "errors"}
    of the requests that completed in the measured window on `results`."""
    import httpx

    async def run(k: int, bodies: list[bytes]) -> dict:
        record = {"latencies": [], "sequences": 0, "errors": 0, "error_sample": None}
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(limits=limits, timeout=120) as http:
            await http.get(url + "/health")
            barrier.wait()
            begin = time.monotonic()
            measure_from, end = begin + warmup_s, begin + warmup_s + duration_s

            async def one_client(index: int) -> None:
                position = offset + index
                while time.monotonic() < end:
                    body = bodies[position % len(bodies)]
                    position += clients * 7 + 1
                    sent = time.monotonic()
                    response = await http.post(url + "/v1/embeddings", content=body,
                                               headers={"Content-Type": "application/json"})
                    done = time.monotonic()
                    if response.status_code != 200:
                        record["errors"] += 1
                        record["error_sample"] = record["error_sample"] or response.text[:300]
                    elif measure_from <= done <= end:  # completed in the measured window
                        record["latencies"].append(done - sent)
                        record["sequences"] += k

            await asyncio.gather(*(one_client(i) for i in range(clients)))
        return record

    for k, bodies in runs:
        results.put(asyncio.run(run(k, bodies)))


def summarize(records: list[dict], k: int, args) -> dict:
    import numpy as np

    latencies = np.asarray([x for r in records for x in r["latencies"]])
    errors = sum(r["errors"] for r in records)
    if errors:
        sample = next(r["error_sample"] for r in records if r["error_sample"])
        print(f"{PROG}: {errors} requests failed, e.g. {sample}", file=sys.stderr)
    sequences = sum(r["sequences"] for r in records)
    pick = (lambda q: float(np.percentile(latencies, q) * 1e3)) if len(latencies) else (lambda q: float("nan"))
    return {"inputs_per_request": k, "clients": args.clients, "client_processes": args.client_processes,
            "sequences_per_s": sequences / args.duration_s, "requests_per_s": len(latencies) / args.duration_s,
            "latency_ms": {"p50": pick(50), "p90": pick(90), "p99": pick(99)}, "requests": int(len(latencies)),
            "errors": errors}


def drive(url: str, runs: list[tuple[int, list[bytes]]], args, embedder) -> list[dict]:
    """Every run of `runs` ((inputs per request, bodies)) with --clients spread over --client-processes processes
    (spawned once: no fork of this JAX process), one after another; the server's mean batch of each."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = args.client_processes
    shares = [args.clients // processes + (i < args.clients % processes) for i in range(processes)]
    barrier, results = context.Barrier(processes + 1), context.Queue()
    workers = [context.Process(target=client_process, daemon=True,
                               args=(url, runs, share, sum(shares[:i]), args.warmup_s, args.duration_s, barrier,
                                     results)) for i, share in enumerate(shares)]
    for worker in workers:
        worker.start()
    out = []
    for k, _ in runs:
        barrier.wait(timeout=600)
        batches, rows = (embedder.batches_run, embedder.sequences_run) if embedder else (0, 0)
        records = [results.get(timeout=args.warmup_s + args.duration_s + 300) for _ in workers]
        run = summarize(records, k, args)
        run["server_mean_batch"] = ((embedder.sequences_run - rows) / max(embedder.batches_run - batches, 1)
                                    if embedder else None)  # None: the batchers are in the worker processes
        batch = "" if embedder is None else f", mean batch {run['server_mean_batch']:.1f}"
        print(f"{PROG}: {k} per request: {run['sequences_per_s']:,.0f} sequences/s, p50 "
              f"{run['latency_ms']['p50']:.1f} ms, p99 {run['latency_ms']['p99']:.1f} ms{batch}", file=sys.stderr,
              flush=True)
        out.append(run)
    for worker in workers:
        worker.join(30)
    return out


# --- the server -------------------------------------------------------------------------------------------------

class ServerThread:
    """uvicorn serving `app` on a free localhost port in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        # log_config=None: uvicorn leaves this process's logging as it is (its dictConfig would close every
        # handler already installed)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    access_log=False, log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SystemExit(f"{PROG}: the server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def http_stack() -> dict:
    """What uvicorn runs on ("auto": httptools and uvloop when installed, else h11 and asyncio): the server's
    per-request cost, which bounds requests/s, depends on it (pip install httptools uvloop)."""
    import importlib.util

    import uvicorn

    return {"uvicorn": uvicorn.__version__,
            "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
            "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"}


def build_server(model, args):
    from llmjax.embed import bucket_lengths
    from llmjax.infer.embeddings import Embedder, EmbedderConfig
    from llmjax.infer.server import create_app

    max_tokens = max(args.seq_len, min(256, model.cfg.max_seq_len))
    embedder = Embedder(model.params, model.cfg, model.tokenizer,
                        EmbedderConfig(max_batch=args.max_batch, max_inputs=max(2048, max(args.inputs)),
                                       max_tokens=max_tokens, batch_wait_s=args.batch_wait_ms / 1000))
    tick = time.perf_counter()
    length = next(b for b in bucket_lengths(max_tokens) if b >= args.seq_len)
    compiled = embedder.warmup(lengths=[length])
    print(f"{PROG}: compiled {compiled} batch shapes of {length} tokens in {time.perf_counter() - tick:.1f} s",
          file=sys.stderr, flush=True)
    app = create_app(None, model.tokenizer, model_name=MODEL_NAME, max_model_len=model.cfg.max_seq_len,
                     embedder=embedder)
    return app, embedder


def worker_app(args):
    """The app of one --server-workers process (spawned: it loads the model and compiles itself)."""
    from llmjax.io.models import load_model

    model = load_model(hf=args.hf, preset=args.model, compute_dtype=args.compute_dtype)
    return build_server(model, args)[0]


class ServerWorkers:
    """--server-workers processes on one free localhost port (llmjax.infer.server.ServerProcesses); entering waits
    until every one has answered /health (each loads the model and compiles before it accepts) and gives the URL."""

    def __init__(self, args, timeout: float = 900):
        from llmjax.infer.server import ServerProcesses

        self.servers = ServerProcesses(worker_app, args, workers=args.server_workers, port=0, log_level="warning")
        self.timeout = timeout

    def __enter__(self) -> str:
        import httpx

        self.servers.start()
        url, workers = f"http://127.0.0.1:{self.servers.port}", len(self.servers.processes)
        pids, deadline = set(), time.monotonic() + self.timeout
        while len(pids) < workers:
            if time.monotonic() > deadline or not all(p.is_alive() for p in self.servers.processes):
                self.__exit__()
                raise SystemExit(f"{PROG}: {len(pids)} of {workers} server processes answered (a process died or "
                                 f"{self.timeout:.0f} s passed)")
            try:
                pids.add(httpx.get(url + "/health", timeout=10).json()["pid"])
            except httpx.TransportError:
                time.sleep(0.5)
        return url

    def __exit__(self, *exc) -> None:
        self.servers.stop()
        self.servers.wait()


def check_answers(url: str, model, sequences: list[list[int]]) -> float:
    """Max |server - embed_ids| over a few sequences (the served vectors are the library's)."""
    import base64

    import httpx
    import numpy as np

    from llmjax.embed import embed_ids

    few = sequences[:8]
    body = {"model": MODEL_NAME, "input": few, "encoding_format": "base64"}
    data = httpx.post(url + "/v1/embeddings", json=body, timeout=120).json()["data"]
    served = np.stack([np.frombuffer(base64.b64decode(item["embedding"]), "<f4") for item in data])
    pad = model.tokenizer.special_ids.pad or 0
    expected = embed_ids(model.params, model.cfg, few, pad_id=pad, batch_size=8, max_len=len(few[0]))
    return float(np.abs(served - expected).max())


def run_library(model, sequences: list[list[int]], args) -> dict:
    """The same sequences through `llmjax.embed.embed_ids` in this process, no HTTP (batches of --max-batch, one
    transfer at the end): what the model alone sustains, so the server's gap to it is the HTTP layer's cost."""
    from llmjax.embed import embed_ids

    count = args.peer_sequences or 8 * args.peer_batch_size
    batch = [sequences[i % len(sequences)] for i in range(max(count, args.max_batch))]
    pad = model.tokenizer.special_ids.pad or 0

    def run() -> None:
        embed_ids(model.params, model.cfg, batch, pad_id=pad, batch_size=args.max_batch, max_len=args.seq_len)

    run()  # compiles
    tick = time.perf_counter()
    run()
    seconds = time.perf_counter() - tick
    return {"name": "llmjax.embed.embed_ids (no HTTP)", "batch_size": args.max_batch, "sequences": len(batch),
            "seconds": seconds, "sequences_per_s": len(batch) / seconds}


# --- the peer ---------------------------------------------------------------------------------------------------

def run_peer(folder: Path, texts: list[str], args) -> dict:
    """sentence-transformers' encode of `texts` cut at --seq-len tokens: sequences/s over a timed run after a
    warm-up batch."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(str(folder), device=device)
    model.max_seq_length = args.seq_len
    lengths = model.tokenize(texts[:64])["attention_mask"].sum(1)
    count = args.peer_sequences or 8 * args.peer_batch_size
    batch = [texts[i % len(texts)] for i in range(count)]
    model.encode(batch[:args.peer_batch_size], batch_size=args.peer_batch_size, convert_to_numpy=True)
    if device == "cuda":
        torch.cuda.synchronize()
    tick = time.perf_counter()
    model.encode(batch, batch_size=args.peer_batch_size, convert_to_numpy=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tick
    return {"name": "sentence-transformers encode", "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "batch_size": args.peer_batch_size, "sequences": count,
            "seconds": seconds, "sequences_per_s": count / seconds,
            "tokens_per_sequence": {"min": int(np.min(lengths.numpy())), "max": int(np.max(lengths.numpy()))}}


# --- the report -------------------------------------------------------------------------------------------------

def print_table(report: dict) -> None:
    stack = report["server"]
    print(f"\n/v1/embeddings, {report['model']} on {report['device']}, {report['args']['clients']} clients, "
          f"{report['args']['seq_len']}-token sequences sent as {report['args']['input']} (uvicorn {stack['uvicorn']}, "
          f"{stack['http']}, {stack['loop']})")
    print(f"{'inputs/request':>15} {'sequences/s':>12} {'requests/s':>11} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'errors':>7} {'vs peer':>8}")
    peer = report.get("peer")
    for run in report["runs"]:
        ratio = f"{run['sequences_per_s'] / peer['sequences_per_s']:.2f}x" if peer else "-"
        latency = run["latency_ms"]
        print(f"{run['inputs_per_request']:>15} {run['sequences_per_s']:>12,.0f} {run['requests_per_s']:>11,.0f} "
              f"{latency['p50']:>8.1f} {latency['p90']:>8.1f} {latency['p99']:>8.1f} {run['errors']:>7} {ratio:>8}")
    library = report.get("library")
    if library:
        print(f"model alone: {library['name']}, batch {library['batch_size']}: {library['sequences_per_s']:,.0f} "
              f"sequences/s")
    if peer:
        print(f"peer: {peer['name']} on {peer['device_name']} (torch {peer['torch']}, batch {peer['batch_size']}): "
              f"{peer['sequences_per_s']:,.0f} sequences/s")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, peer = report["runs"], report.get("peer")
    labels = [f"server, {r['inputs_per_request']}/request" for r in runs] + (["sentence-transformers"] if peer else [])
    rates = [r["sequences_per_s"] for r in runs] + ([peer["sequences_per_s"]] if peer else [])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.barh(labels, rates, color=["tab:blue"] * len(runs) + ["tab:gray"] * bool(peer))
    left.set_xlabel(f"sequences/s ({report['args']['seq_len']} tokens)")
    left.set_title(f"{report['model']} on {report['device']}")
    ks = [str(r["inputs_per_request"]) for r in runs]
    for q in ("p50", "p99"):
        right.plot(ks, [r["latency_ms"][q] for r in runs], marker="o", label=q)
    right.set_xlabel("inputs per request")
    right.set_ylabel("request latency (ms)")
    right.set_title(f"{report['args']['clients']} concurrent clients")
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the peer (torch) room on the same GPU
    from llmjax.infer.server import require_serve_extra

    require_serve_extra()
    import jax

    from llmjax.io.models import ModelLoadError, load_model, model_name, resolve_hf_model

    try:
        model = load_model(hf=args.hf, preset=args.model, compute_dtype=args.compute_dtype)
    except ModelLoadError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    if args.seq_len > model.cfg.max_seq_len:
        print(f"{PROG}: --seq-len={args.seq_len}: the model reads at most {model.cfg.max_seq_len} tokens",
              file=sys.stderr)
        return 2
    sequences, texts = corpus_sequences(model.tokenizer, args.seq_len, args.sequences)
    report = {"model": model_name(hf=args.hf, preset=args.model), "device": jax.devices()[0].device_kind,
              "backend": jax.default_backend(), "jax": jax.__version__, "compute_dtype": model.cfg.compute_dtype,
              "server": http_stack(), "client": "httpx", "cpu_count": os.cpu_count(),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report["server"]["workers"] = args.server_workers
    runs = [(k, request_bodies(sequences, texts, k, args.seq_len, args.input)) for k in args.inputs]
    if args.server_workers == 1:
        app, embedder = build_server(model, args)
        server = ServerThread(app)
    else:
        embedder, server = None, ServerWorkers(args)  # the batchers live in the worker processes
    with server as url:
        report["max_abs_difference_vs_embed_ids"] = check_answers(url, model, sequences)
        report["runs"] = drive(url, runs, args, embedder)
        args.out.write_text(json.dumps(report, indent=1))
    report["library"] = run_library(model, sequences, args)
    best = max(run["sequences_per_s"] for run in report["runs"])
    report["ratio_best_server_vs_library"] = best / report["library"]["sequences_per_s"]
    if not args.no_peer:
        report["peer"] = run_peer(resolve_hf_model(args.hf), texts, args)
        report["ratio_best_server_vs_peer"] = best / report["peer"]["sequences_per_s"]
    args.out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"best server / model alone: {report['ratio_best_server_vs_library']:.2f}x")
    if "ratio_best_server_vs_peer" in report:
        print(f"best server / peer: {report['ratio_best_server_vs_peer']:.2f}x")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0
