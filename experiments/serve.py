"""Serve a model over HTTP with the OpenAI API (completions, chat, streaming, embeddings), continuously batched.

An encoder (`--hf all-minilm-l6-v2`) is served for POST /v1/embeddings alone; a decoder answers completions, chat and
embeddings (last-token pooling by default)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmjax.io.models import GGUF_HELP, QUANTIZED_HELP, end_of_text_ids  # noqa: F401  (end_of_text_ids: serve's, for importers)

PROG = "python -m experiments serve"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="An OpenAI-compatible HTTP server (POST /v1/completions, POST /v1/chat/completions, streamed by "
        "server-sent events; POST /v1/embeddings, concurrent requests batched together; GET /v1/models, /health, "
        "/metrics) over llmjax's continuous-batching engine with a paged KV cache. An encoder (BERT-style: --hf "
        "all-minilm-l6-v2) serves embeddings only, without an engine. "
        "The model comes from a run folder (--ckpt), a Hugging Face folder or hub id (--hf), a GGUF "
        "file or packaged model (--gguf smollm2-135m-instruct: a real chat model, its chat template and end-of-reply "
        "token from the file) or a random preset (--model, for trying things out). Needs the serve extra: "
        "./install.sh serve.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help="a run folder written by `experiments train` / `quickstart`")
    source.add_argument("--hf", metavar="FOLDER_OR_HUB_ID",
                        help="a Hugging Face model: a local folder (config.json + safetensors + tokenizer) or a hub "
                        "id owner/name[@revision], fetched into the hub cache (online, or from the cache offline)")
    source.add_argument("--gguf", metavar="PATH_OR_NAME", help=GGUF_HELP + " (served with float32 weights)")
    p.add_argument("--quantized", action="store_true", help=QUANTIZED_HELP)
    source.add_argument("--model", help="a model preset with random weights (its vocabulary is the tokenizer's)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (default: the run's tokenizer.json / the HF folder's / the GGUF file's; 'bytes' "
                   "for --model)")
    p.add_argument("--chat-template", type=Path, default=None,
                   help="a Jinja chat template file (default: the GGUF's tokenizer.chat_template or the tokenizer "
                   "config's chat_template, else the plain 'Role: content' template described in "
                   "llmjax/infer/server.py)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the folder's or preset's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="if set, every /v1 request must send 'Authorization: Bearer KEY' (401 otherwise)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests allowed to wait for a slot in the engine; more get HTTP 429")
    p.add_argument("--num-blocks", type=int, default=1024, help="KV-cache blocks in the pool")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--max-running", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-tokens-per-step", type=int, default=512,
                   help="token budget of one engine step (decode tokens + prefill chunks)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prompt prefixes")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip compiling every shape bucket before serving (the first requests then compile); the "
                   "embedding buckets are compiled ahead for an encoder only")
    p.add_argument("--seed", type=int, default=0, help="seed of --model's random weights")
    embed = p.add_argument_group("embeddings (POST /v1/embeddings)")
    embed.add_argument("--no-embeddings", action="store_true",
                       help="a decoder: do not answer /v1/embeddings (an encoder serves nothing else)")
    embed.add_argument("--pooling", choices=("mean", "cls", "last"), default=None,
                       help="default: mean for an encoder, last token for a decoder")
    embed.add_argument("--no-normalize", action="store_true", help="embeddings keep their length (default: unit L2)")
    embed.add_argument("--embed-max-batch", type=int, default=256,
                       help="inputs embedded in one forward pass, gathered from concurrent requests")
    embed.add_argument("--embed-max-inputs", type=int, default=2048, help="inputs one request may send (400 above)")
    embed.add_argument("--embed-max-tokens", type=int, default=None,
                       help="tokens per input (400 above, unless the request sends truncate_prompt_tokens); "
                            "default: 256 or the model's context if shorter")
    embed.add_argument("--embed-batch-wait-ms", type=float, default=2.0,
                       help="an idle batcher waits this long for more requests before running a batch that is not "
                            "full (while a batch runs, the next one gathers anyway)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes accepting on the one port, each with its own copy of the model, engine "
                   "and embedding batcher on the same device (one process answers a few thousand small requests a "
                   "second; more raise that while the device has room). With N > 1 each process may use 0.9 / N of "
                   "the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info logs every request)")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    for flag, value, least in (("--embed-max-batch", args.embed_max_batch, 1),
                               ("--embed-max-inputs", args.embed_max_inputs, 1),
                               ("--embed-max-tokens", args.embed_max_tokens, 2),
                               ("--embed-batch-wait-ms", args.embed_batch_wait_ms, 0),
                               ("--workers", args.workers, 1)):
        if value is not None and value < least:
            p.error(f"{flag}={value}: must be >= {least}")
    return args


def default_model_name(args) -> str:
    """The preset's name, the hub id as given (owner/name, not its snapshot folder), a packaged GGUF model's name or
    the file's stem, else the folder's name."""
    from llmjax.io.models import model_name

    return model_name(ckpt=args.ckpt, hf=args.hf, gguf=getattr(args, "gguf", None), preset=args.model)


def build_embedder(args, model):
    """The /v1/embeddings batcher of the flags (None with --no-embeddings or --quantized); ValueError (one line) for
    sizes that do not fit the model."""
    from llmjax.infer.embeddings import Embedder, EmbedderConfig

    if args.no_embeddings or args.quantized:
        if not model.cfg.causal:
            raise ValueError("an encoder serves embeddings only: drop --no-embeddings / --quantized")
        return None
    config = EmbedderConfig(max_batch=args.embed_max_batch, max_inputs=args.embed_max_inputs,
                            max_tokens=args.embed_max_tokens, batch_wait_s=args.embed_batch_wait_ms / 1000,
                            pooling=args.pooling, normalize=not args.no_normalize)
    return Embedder(model.params, model.cfg, model.tokenizer, config)


def warm_up_embedder(embedder) -> None:
    print(f"{PROG}: compiling the embedding buckets ({len(embedder.row_buckets)} batch sizes x "
          f"{len(embedder.length_buckets)} lengths) ...", file=sys.stderr, flush=True)
    embedder.warmup()


def build_app(args):
    """(the ASGI app over a new engine and / or embedder, the served model's name, its config) from the flags;
    ModelLoadError, EngineError or ValueError (one line) for a model or sizes that cannot be had."""
    from llmjax.infer.engine import Engine, EngineConfig
    from llmjax.infer.server import create_app
    from llmjax.io.models import load_model

    name = args.served_model_name or default_model_name(args)
    model = load_model(ckpt=args.ckpt, hf=args.hf, gguf=args.gguf, preset=args.model, tokenizer=args.tokenizer,
                       chat_template=args.chat_template, quantized=args.quantized, seed=args.seed)
    cfg, params = model.cfg, model.params
    embedder = build_embedder(args, model)
    if not cfg.causal:  # an encoder: no generation engine
        if not args.no_warmup:
            warm_up_embedder(embedder)
        app = create_app(None, model.tokenizer, model_name=name, max_model_len=cfg.max_seq_len, api_key=args.api_key,
                         embedder=embedder)
        return app, name, cfg
    if args.quantized:  # the decode layout with the file's quantized matrices (kernels.matmul_quant)
        from llmjax.quant.model import quantized_decode_params

        params = quantized_decode_params(params, cfg, "auto", head="auto")
    config = EngineConfig(num_blocks=args.num_blocks, block_size=args.block_size, max_running=args.max_running,
                          max_tokens_per_step=args.max_tokens_per_step, max_queue=args.max_queue,
                          prefix_caching=not args.no_prefix_caching)
    end_ids = list(model.end_ids)
    engine = Engine(params, cfg, config, eos_token_id=end_ids[0] if end_ids else None, prepared=args.quantized)
    if not args.no_warmup:
        print(f"{PROG}: compiling the engine's shape buckets ...", file=sys.stderr, flush=True)
        engine.warmup()  # a decoder's embedding programs compile on first use (generation is what it is served for)
    app = create_app(engine, model.tokenizer, model_name=name, max_model_len=cfg.max_seq_len,
                     chat_format=model.chat_format, api_key=args.api_key, stop_token_ids=end_ids[1:],
                     embedder=embedder)
    return app, name, cfg


def worker_app(argv: list[str]):
    """The app of one `--workers` process (spawned: it parses the flags and loads the model itself)."""
    from llmjax.infer.engine import EngineError
    from llmjax.io.models import ModelLoadError

    try:
        return build_app(parse_args(argv))[0]
    except (ModelLoadError, EngineError, ImportError, ValueError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from llmjax.infer.server import require_serve_extra, serve, serve_processes

    try:
        require_serve_extra()
    except ImportError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    if args.workers > 1:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.workers:.3f}")  # inherited by each
        print(f"{PROG}: serving on http://{args.host}:{args.port}/v1 with {args.workers} worker processes (each loads "
              "the model and compiles before it accepts)", file=sys.stderr, flush=True)
        return serve_processes(worker_app, argv, workers=args.workers, host=args.host, port=args.port,
                               log_level=args.log_level)
    from llmjax.infer.engine import EngineError
    from llmjax.io.models import ModelLoadError

    try:
        app, name, cfg = build_app(args)
    except (ModelLoadError, EngineError, ImportError, ValueError) as error:  # sizes that do not fit together
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    what = "embeddings of " if not cfg.causal else ""
    print(f"{PROG}: serving {what}{name!r} (context {cfg.max_seq_len} tokens) on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
