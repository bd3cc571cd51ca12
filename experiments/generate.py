"""Generate text or chat (a run, a Hugging Face folder, a GGUF file): greedy, sampling, beam, constrained, speculative.

Streamed to the terminal; --chat renders questions through the model's chat template."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmjax.io.models import GGUF_HELP, QUANTIZED_HELP


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments generate",
        description="Generate continuations of --prompt, or answers to --chat questions, with a KV cache, on the "
        "device. The model comes from a run folder (--ckpt: its newest checkpoint and tokenizer.json), a Hugging Face "
        "folder or hub id (--hf), a GGUF file or packaged model (--gguf smollm2-135m-instruct) or a random preset "
        "(--model, for trying things out). Tokens stream to the terminal as they are produced (one prompt, not beam). "
        "A row stops at the model's end-of-reply token (a GGUF's tokenizer.ggml.eos_token_id, <|im_end|> for "
        "SmolLM2; a folder's generation_config.json eos_token_id; else <|endoftext|>). --chat samples like --prompt "
        "(--strategy sample, temperature 0.8): add --strategy greedy for the model's most likely answer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help="a run folder written by `experiments train` / `quickstart`")
    source.add_argument("--hf", metavar="FOLDER_OR_HUB_ID",
                        help="a Hugging Face model: a local folder (config.json + safetensors) or a hub id "
                        "owner/name[@revision], fetched into the hub cache (online, or from the cache offline)")
    source.add_argument("--gguf", metavar="PATH_OR_NAME", help=GGUF_HELP)
    source.add_argument("--model", help="a model preset with random weights (its vocab is the tokenizer's)")
    p.add_argument("--quantized", action="store_true", help=QUANTIZED_HELP)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (default: the run's tokenizer.json / the HF folder's / the GGUF file's)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", action="append", help="prompt text, continued as is (repeat for a batch)")
    text.add_argument("--chat", action="append", metavar="QUESTION",
                      help="a user message, rendered through the model's chat template (a GGUF's "
                      "tokenizer.chat_template, a folder's tokenizer_config.json, or --chat-template) and answered "
                      "(repeat for a batch: one conversation each); a model without a template is refused")
    p.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                   help="a Jinja chat template file for --chat, replacing the model's")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--strategy", choices=["greedy", "sample", "beam"], default="sample")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt (the next get seed + 1, ...)")
    p.add_argument("--beams", type=int, default=4, help="beam search: beams")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score = logprob / length ** this")
    p.add_argument("--groups", type=int, default=1, help="diverse beam search: beam groups")
    p.add_argument("--diversity-penalty", type=float, default=0.0, help="diverse beam search: penalty")
    p.add_argument("--regex", help="the output must match this regular expression")
    p.add_argument("--json-schema", help="the output must be JSON valid against this schema (JSON text or @file)")
    p.add_argument("--stop", action="append", default=[], help="stop when the output contains this string")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--cache-dtype", default=None, help="KV cache dtype: bfloat16, float32 or int8")
    p.add_argument("--truncate", action="store_true", help="cut prompts that do not fit the context from the left")
    p.add_argument("--no-stream", action="store_true", help="print the outputs at the end only")
    p.add_argument("--draft-ckpt", type=Path, default=None,
                   help="speculative decoding: a smaller run of the same vocabulary drafts --k tokens per round and "
                        "the model verifies them in one pass (greedy outputs equal plain greedy; sampling keeps the "
                        "model's distribution); outputs print at the end with the acceptance rate")
    p.add_argument("--draft-hf", default=None, metavar="FOLDER_OR_HUB_ID",
                   help="speculative decoding: the draft from a Hugging Face folder or hub id (as --hf)")
    p.add_argument("--draft-model", default=None, help="speculative decoding: a draft preset with random weights")
    p.add_argument("--k", type=int, default=4, help="speculative decoding: draft tokens per round")
    p.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                   help="spread the weights over devices, e.g. tensor=2 (Megatron) or fsdp=-1; default: one device")
    p.add_argument("--sharding", default="auto", help="sharding strategy for --mesh (see `experiments train --help`)")
    return p.parse_args(argv)


def load_model(args):
    """The model of --ckpt / --hf / --gguf / --model (`llmjax.io.models.load_model`); ModelLoadError, one line, when
    the flag names nothing loadable."""
    from llmjax.io.models import load_model as load

    return load(ckpt=args.ckpt, hf=args.hf, gguf=getattr(args, "gguf", None), preset=args.model,
                tokenizer=args.tokenizer, chat_template=getattr(args, "chat_template", None),
                quantized=getattr(args, "quantized", False), seed=args.seed)


def load_draft(args, tokenizer):
    """(params, cfg) of the draft model from --draft-ckpt, --draft-hf or --draft-model; None without one."""
    chosen = [flag for flag, value in (("--draft-ckpt", args.draft_ckpt), ("--draft-hf", args.draft_hf),
                                       ("--draft-model", args.draft_model)) if value is not None]
    if not chosen:
        return None
    if len(chosen) > 1:
        raise SystemExit(f"python -m experiments generate: give one draft, not {' and '.join(chosen)}")
    return load_weights(args.draft_ckpt, args.draft_hf, args.draft_model, tokenizer.vocab_size, args.seed)


def load_weights(run: Path | None, hf: str | Path | None, preset: str | None, vocab_size: int, seed: int):
    """(params, cfg) from a run folder, else a Hugging Face folder or hub id, else a preset with random weights."""
    from llmjax.io.models import restore_params

    if run is not None:
        return restore_params(run)
    if hf is not None:
        from llmjax.io import load_hf_checkpoint
        from llmjax.io.hub import resolve_hf_folder

        return load_hf_checkpoint(resolve_hf_folder(hf))
    import jax

    from llmjax.config import get_config
    from llmjax.model import init_params

    cfg = get_config(preset, vocab_size=vocab_size)
    return init_params(cfg, jax.random.key(seed)), cfg


def speculative_conflicts(args) -> list[str]:
    """The flags speculative decoding cannot honour (it keeps temperature, top-k, top-p and min-p only)."""
    named = [("--strategy beam", args.strategy == "beam"), ("--regex", args.regex), ("--json-schema", args.json_schema),
             ("--stop", args.stop), ("--mesh", args.mesh), ("--truncate", args.truncate),
             ("--repetition-penalty", args.repetition_penalty != 1.0),
             ("--presence-penalty", args.presence_penalty != 0.0),
             ("--frequency-penalty", args.frequency_penalty != 0.0)]
    return [flag for flag, used in named if used]


def run_speculative(args, params, cfg, draft, tokenizer, prompts, sampling, eos_id, texts, prepared=None) -> int:
    """Speculative decoding of every prompt; prints one JSON line per prompt and the acceptance statistics."""
    import time

    from llmjax.infer.speculative import speculative_generate

    conflicts = speculative_conflicts(args)
    if conflicts:
        raise SystemExit(f"python -m experiments generate: speculative decoding (a draft model) does not take "
                         f"{', '.join(conflicts)}")
    draft_params, draft_cfg = draft
    started = time.perf_counter()
    out = speculative_generate(params, cfg, draft_params, draft_cfg, prompts, k=args.k,
                               max_new_tokens=args.max_new_tokens, sampling=sampling, eos_id=eos_id,
                               cache_dtype=args.cache_dtype, target_prepared=prepared)
    seconds = time.perf_counter() - started
    for text, tokens, reason in zip(texts, out.tokens, out.finish_reasons):
        body = tokenizer.decode([t for t in tokens if t != eos_id])
        print(json.dumps({"prompt" if args.prompt else "chat": text, "output": body, "finish_reason": reason,
                          "tokens": len(tokens)}))
    stats = out.stats
    print(f"[speculative, k={args.k}: acceptance {stats.acceptance_rate:.3f}, {stats.tokens_per_target_call:.2f} "
          f"tokens per target pass, {stats.generated} tokens in {seconds:.2f} s including compilation]")
    return 0


class Streamer:
    """Prints row 0's tokens as they arrive, holding back bytes of a character cut between tokens."""

    def __init__(self, tokenizer, eos_id):
        self.tokenizer, self.eos_id, self.pending = tokenizer, eos_id, b""

    def __call__(self, step, tokens):
        token = int(tokens[0])
        if token < 0 or token == self.eos_id:
            return
        self.pending += self.tokenizer.decode_bytes([token])
        try:
            text, self.pending = self.pending.decode("utf-8"), b""
        except UnicodeDecodeError as error:
            cut = error.start if error.reason == "unexpected end of data" else len(self.pending)
            text, self.pending = self.pending[:cut].decode("utf-8", errors="replace"), self.pending[cut:]
        sys.stdout.write(text)
        sys.stdout.flush()


def sampling_configs(args, count: int) -> list:
    """One SamplingConfig per prompt from the flags (prompt i seeded args.seed + i)."""
    from llmjax.infer.sampling import SamplingConfig

    temperature = 0.0 if args.strategy == "greedy" else args.temperature
    return [SamplingConfig(temperature=temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                           repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                           frequency_penalty=args.frequency_penalty, seed=args.seed + i) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llmjax.infer import constrained
    from llmjax.infer.beam import beam_search
    from llmjax.infer.generate import GenerationError, generate
    from llmjax.infer.sampling import SamplingError
    from llmjax.io.hub import HubError
    from llmjax.io.models import ModelLoadError

    try:
        model = load_model(args)
        params, cfg, tokenizer = model.params, model.cfg, model.tokenizer
        texts = args.prompt or args.chat
        prompts = [tokenizer.encode_prompt(text) for text in chat_prompts(args, model)]
        draft = load_draft(args, tokenizer)
    except (HubError, ModelLoadError) as error:
        print(f"python -m experiments generate: {error}", file=sys.stderr)
        return 2
    prepared = None
    if args.quantized:
        if args.mesh is not None:
            raise SystemExit("python -m experiments generate: --quantized runs on one device; drop --mesh")
        from llmjax.quant.model import quantized_decode_params

        # "auto": the fused kernel on GPUs, the few-row matvec on CPUs; the head int8 where that is exact
        prepared, params = quantized_decode_params(params, cfg, "auto", head="auto"), None
    if args.mesh is not None:
        from llmjax.parallel.plan import Plan

        params = Plan.create(args.mesh, args.sharding).place_params(params, cfg)
    eos_id = None if args.no_eos else (model.end_ids[0] if model.end_ids else None)
    try:
        if draft is not None:
            return run_speculative(args, params, cfg, draft, tokenizer, prompts, sampling_configs(args, len(prompts)),
                                   eos_id, texts, prepared)
        if args.strategy == "beam":
            if args.regex or args.json_schema:
                raise GenerationError("--regex / --json-schema work with --strategy greedy or sample, not beam")
            out = beam_search(params, cfg, prompts, num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                              eos_id=eos_id, length_penalty=args.length_penalty, num_groups=args.groups,
                              diversity_penalty=args.diversity_penalty, truncate=args.truncate,
                              cache_dtype=args.cache_dtype, prepared=prepared)
            for text, hypotheses, scores in zip(texts, out.sequences, out.scores):
                print(f"{'prompt' if args.prompt else 'chat'}: {text!r}")
                for rank, (tokens, score) in enumerate(zip(hypotheses, scores)):
                    body = tokenizer.decode([t for t in tokens if t != eos_id])
                    print(f"  beam {rank} (score {score:.3f}): {(text if args.prompt else '') + body!r}")
            return 0
        constraint = None
        if args.regex:
            constraint = constrained.regex_automaton(args.regex, tokenizer, cfg.padded_vocab_size)
        elif args.json_schema:
            schema = args.json_schema
            if schema.startswith("@"):
                schema = Path(schema[1:]).read_text()
            constraint = constrained.json_schema_automaton(schema, tokenizer, cfg.padded_vocab_size)
        sampling = sampling_configs(args, len(prompts))
        stream = None
        if not args.no_stream and len(prompts) == 1:
            print(args.prompt[0] if args.prompt else "", end="", flush=True)  # a chat prints the answer only
            stream = Streamer(tokenizer, eos_id)
        out = generate(params, cfg, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, eos_id=eos_id,
                       stop_strings=args.stop or None, tokenizer=tokenizer, constraint=constraint,
                       truncate=args.truncate, cache_dtype=args.cache_dtype, stream=stream, prepared=prepared)
    except (GenerationError, SamplingError, constrained.ConstraintError) as error:
        print(f"python -m experiments generate: {error}", file=sys.stderr)
        return 2
    if stream is not None:
        print(f"\n[{out.finish_reasons[0]}, {len(out.tokens[0])} tokens]")
        return 0
    for text, tokens, reason in zip(texts, out.tokens, out.finish_reasons):
        body = tokenizer.decode([t for t in tokens if t != eos_id])
        print(json.dumps({"prompt" if args.prompt else "chat": text, "output": body, "finish_reason": reason,
                          "tokens": len(tokens)}))
    return 0


def chat_prompts(args, model) -> list[str]:
    """The texts to encode: --prompt as given, or each --chat question as one user turn through the chat template
    (ModelLoadError when the model has none)."""
    from llmjax.io.models import ModelLoadError

    if args.prompt:
        return args.prompt
    try:
        chat_format = model.chat_format.require_template(str(model.source or args.model))
    except ValueError as error:
        raise ModelLoadError(str(error)) from None
    return [chat_format.render([{"role": "user", "content": question}]) for question in args.chat]

