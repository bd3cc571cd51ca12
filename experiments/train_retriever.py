"""Train a dense docstring -> code retriever (InfoNCE, in-batch + mined hard negatives); compare with its start, BM25.

    python -m experiments train_retriever --init minilm --steps 1000 --batch 128 --hard-negatives bm25 \\
        --towers shared --lora-rank 0 --out runs/train_retriever/minilm

The encoder (all-MiniLM-L6-v2, or a random llmjax preset such as bert-tiny) is trained on the training queries of
llmjax.retrieval.code_task with llmjax.retrieval.contrastive's InfoNCE: each query against its code, the other
queries' code in the batch, and --num-hard mined hard negatives (sampled each step from its top --hard-pool
documents by BM25, mined once, or by the current model's index, re-mined every --refresh-every steps). Negatives
are mined among training and distractor documents only: held-out modules' code is never seen. Towers: one shared
encoder or separate query / document encoders; full fine-tuning or LoRA (--lora-rank; merged into the saved weights).
AdamW with linear warmup and cosine decay (optax). Writes an orbax checkpoint with retriever.json (so
`retrieval_eval --retriever RUN` loads it), metrics.json (recall@1/10/100 and MRR on the held-out queries of BM25,
the starting model and the trained one; the loss curve) and training.png.

--objective realm trains the same towers end to end through a frozen language model instead (REALM; RAG-sequence or
RAG-token, llmjax.retrieval.realm): each step retrieves every query's top --realm-k documents from an index of the
training and distractor documents (re-embedded with the current document tower and rebuilt every --refresh-every
steps), the LM (--lm) scores the query's code after each document and the query, and the loss is the negative log of
the retrieval-weighted mixture of those likelihoods, so documents that make the code likely gain score. The held-out
evaluation then adds the RAG loss (nats per code token, marginalized over the top --realm-k of the whole pool) of the
starting and the trained retriever, and the LM's loss on the same tokens without retrieval.

    python -m experiments train_retriever --objective realm --init minilm --lm gguf:smollm2-135m-instruct \
        --steps 300 --batch 32 --realm-k 8 --out runs/train_retriever/realm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

PROG = "python -m experiments train_retriever"
HARD_NEGATIVES = ("bm25", "index", "none")
OBJECTIVES = ("infonce", "realm")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv):
    from llmjax.experiments.retrieval_eval import add_task_flags
    from llmjax.retrieval.contrastive import TOWERS

    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", default="minilm",
                   help="the starting encoder: minilm (all-MiniLM-L6-v2's weights) or an llmjax preset (random "
                        "weights: bert-tiny, minilm-l6)")
    p.add_argument("--tokenizer", default=None,
                   help="a preset's tokenizer (a tokenizer file or folder; default: bytes)")
    p.add_argument("--data", choices=("code_task",), default="code_task",
                   help="the training data: the standard library's docstring -> code task")
    add_task_flags(p)
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=128, help="queries per step (each with its positive)")
    p.add_argument("--hard-negatives", choices=HARD_NEGATIVES, default="bm25",
                   help="where hard negatives come from: BM25 (mined once), the current model's index (re-mined "
                        "every --refresh-every steps), or none (in-batch negatives only)")
    p.add_argument("--num-hard", type=int, default=3, help="hard negatives per query per step")
    p.add_argument("--hard-pool", type=int, default=30, help="hard negatives are sampled from each query's top N")
    p.add_argument("--refresh-every", type=int, default=200, help="--hard-negatives index: steps between re-mining")
    p.add_argument("--towers", choices=TOWERS, default="shared",
                   help="one encoder for queries and documents, or two (both start from --init)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank of every attention / MLP matrix; 0: full "
                                                            "fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-5 full, 2e-4 LoRA)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 10%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay (matrices only)")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature")
    p.add_argument("--symmetric", action="store_true", help="add the document -> query InfoNCE term")
    p.add_argument("--query-max-len", type=int, default=64, help="tokens of a query (longer ones are cut)")
    p.add_argument("--doc-max-len", type=int, default=256, help="tokens of a document (longer ones are cut)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None,
                   help="the encoder's compute dtype (default: its own); parameters and optimizer state stay float32")
    p.add_argument("--eval-batch-size", type=int, default=128, help="texts embedded per batch when evaluating")
    p.add_argument("--skip-start-eval", action="store_true", help="do not evaluate the starting model")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also measure the held-out recall every N steps (a curve in metrics.json and the PNG; for "
                        "reading how long to train, not for choosing the reported model); 0: only at the end")
    p.add_argument("--log-every", type=int, default=10, help="steps between loss lines")
    p.add_argument("--train-seed", type=int, default=0, help="batches, hard-negative sampling and LoRA init")
    p.add_argument("--out", type=Path, default=None, help="the run folder (default: runs/train_retriever/INIT)")
    p.add_argument("--objective", choices=OBJECTIVES, default="infonce",
                   help="infonce: contrastive against the positive code; realm: end to end through --lm's likelihood "
                        "of the code (no positives used; hard-negative flags ignored)")
    realm = p.add_argument_group("REALM (--objective realm)")
    realm.add_argument("--lm", default=None, metavar="SOURCE:NAME",
                       help="the frozen language model: gguf:smollm2-135m-instruct, ckpt:RUN, hf:FOLDER or "
                            "preset:NAME (random weights, for tests)")
    realm.add_argument("--realm-k", type=int, default=8, help="documents retrieved and marginalized per query")
    realm.add_argument("--marginal", choices=("sequence", "token"), default="sequence",
                       help="RAG-sequence (REALM) or RAG-token marginal likelihood")
    realm.add_argument("--lm-doc-tokens", type=int, default=192, help="LM tokens of a retrieved document (its start)")
    realm.add_argument("--lm-query-tokens", type=int, default=64, help="LM tokens of the query (its end)")
    realm.add_argument("--lm-target-tokens", type=int, default=64,
                       help="LM tokens of the code scored (its start; shorter code is scored whole)")
    realm.add_argument("--realm-eval-queries", type=int, default=256,
                       help="held-out queries of the RAG-loss evaluation (the first N)")
    args = p.parse_args(argv)
    for flag in ("steps", "batch", "hard_pool", "refresh_every", "query_max_len", "doc_max_len", "eval_batch_size",
                 "log_every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be a positive integer")
    for flag in ("num_hard", "lora_rank", "eval_every"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be >= 0")
    if args.batch < 2:
        p.error(f"--batch={args.batch}: in-batch negatives need at least 2 queries a step")
    if args.temperature <= 0:
        p.error(f"--temperature={args.temperature}: must be positive")
    if args.hard_negatives != "none" and args.num_hard > args.hard_pool:
        p.error(f"--num-hard={args.num_hard} is larger than --hard-pool={args.hard_pool}")
    if args.objective == "realm":
        if not args.lm:
            p.error("--objective realm needs --lm (the frozen language model, e.g. gguf:smollm2-135m-instruct)")
        for flag in ("realm_k", "lm_doc_tokens", "lm_query_tokens", "lm_target_tokens", "realm_eval_queries"):
            if getattr(args, flag) < 1:
                p.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be a positive integer")
        args.hard_negatives = "none"
    if args.hard_negatives == "none":
        args.num_hard = 0
    args.lr = args.lr if args.lr is not None else (2e-4 if args.lora_rank else 2e-5)
    args.warmup = args.warmup if args.warmup is not None else args.steps // 10
    if not 0 <= args.warmup <= args.steps:
        p.error(f"--warmup={args.warmup}: must be within 0 .. --steps={args.steps}")
    args.out = args.out or Path("runs/train_retriever") / Path(args.init).name
    return args


# --- data ------------------------------------------------------------------------------------------------------


def tokenize_padded(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32 [n, max_len], mask bool [n, max_len]) of texts as the encoder reads them (cut to max_len)."""
    from llmjax.embed import tokenize_for_embedding

    pad_id = tokenizer.special_ids.pad if tokenizer.special_ids.pad is not None else 0
    tokens = np.full((len(texts), max_len), pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), bool)
    for i, text in enumerate(texts):
        ids = tokenize_for_embedding(tokenizer, text, max_len)[0]
        tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
    return tokens, mask


def bm25_candidates(task, allowed: np.ndarray, pool: int) -> np.ndarray:
    """int64 [train queries, pool]: each training query's top documents by BM25 among `allowed` rows (its positive
    excluded; -1 where fewer)."""
    from llmjax.retrieval.bm25 import BM25Index

    index = BM25Index([task.documents[i] for i in allowed])
    _, rows = index.search(task.train_queries, min(pool + 1, len(allowed)), progress=True)
    return drop_positives(allowed[rows], task.train_positives, pool)


def drop_positives(candidates: np.ndarray, positives: np.ndarray, pool: int) -> np.ndarray:
    """candidates [q, K] without each query's positive, cut (or padded with -1) to [q, pool]."""
    out = np.full((len(candidates), pool), -1, np.int64)
    for i, (row, positive) in enumerate(zip(candidates, positives)):
        kept = row[row != positive][:pool]
        out[i, :len(kept)] = kept
    return out


def sample_hard(candidates: np.ndarray, queries: np.ndarray, positives: np.ndarray, allowed: np.ndarray,
                count: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [batch, count]: for each query, `count` distinct documents drawn from its mined candidates (topped up
    with random allowed documents other than its positive when it has too few)."""
    out = np.empty((len(queries), count), np.int64)
    for i, (query, positive) in enumerate(zip(queries, positives)):
        mined = candidates[query][candidates[query] >= 0]
        picked = list(rng.choice(mined, size=min(count, len(mined)), replace=False)) if len(mined) else []
        while len(picked) < count:
            extra = int(rng.choice(allowed))
            if extra != positive and extra not in picked:
                picked.append(extra)
        out[i] = picked
    return out


# --- model -----------------------------------------------------------------------------------------------------


def load_init(args):
    """(params, cfg, tokenizer, name) of --init."""
    from llmjax.io.models import load_model

    if args.init.lower() in ("minilm", "all-minilm-l6-v2"):
        model = load_model(hf="all-minilm-l6-v2")
    else:
        model = load_model(preset=args.init, tokenizer=args.tokenizer, seed=args.train_seed)
    cfg = model.cfg if args.compute_dtype is None else dataclasses.replace(model.cfg, compute_dtype=args.compute_dtype)
    return model.params, cfg, model.tokenizer


def make_trainable(params, cfg, args):
    """(trainable tree, frozen tree, LoraConfig or None): {"shared": ...} or {"query": ..., "doc": ...}."""
    import jax

    names = ("shared",) if args.towers == "shared" else ("query", "doc")
    if not args.lora_rank:
        return {name: jax.tree.map(lambda x: x.copy(), params) for name in names}, {}, None
    from llmjax.peft.lora import LoraConfig, init_adapters

    lora_cfg = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank)
    key = jax.random.key(args.train_seed)
    trainable = {name: init_adapters(params, cfg, lora_cfg, jax.random.fold_in(key, i)) for i, name in enumerate(names)}
    return trainable, {name: params for name in names}, lora_cfg


def tower_trees(trainable, frozen, cfg, lora_cfg) -> dict:
    """The plain parameters to save / embed with: {"shared"} or {"query", "doc"} (LoRA merged)."""
    from llmjax.retrieval.contrastive import tower_params

    return {name: tower_params(trainable, frozen, name, cfg, lora_cfg) for name in trainable}


def make_step(cfg, lora_cfg, optimizer, args):
    """The jitted training step (trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss)."""
    import jax
    import optax

    from llmjax.retrieval.contrastive import encode, info_nce_loss, tower_params
    from llmjax.retrieval.realm import realm_loss

    def loss_fn(trainable, frozen, batch):
        query_params = tower_params(trainable, frozen, "query", cfg, lora_cfg)
        doc_params = tower_params(trainable, frozen, "doc", cfg, lora_cfg)
        if args.objective == "realm":
            return realm_loss(query_params, doc_params, batch, cfg, args.temperature, args.marginal)
        queries = encode(query_params, batch["query_tokens"], batch["query_mask"], cfg)  # [B, d]
        size, per_query, length = batch["doc_tokens"].shape  # [B, 1 + M, L]
        docs = encode(doc_params, batch["doc_tokens"].reshape(-1, length), batch["doc_mask"].reshape(-1, length),
                      cfg).reshape(size, per_query, -1)  # [B, 1 + M, d]
        hard = docs[:, 1:] if per_query > 1 else None
        return info_nce_loss(queries, docs[:, 0], hard, temperature=args.temperature, symmetric=args.symmetric,
                             doc_ids=batch["doc_ids"][:, 0], hard_ids=batch["doc_ids"][:, 1:] if hard is not None
                             else None)

    def step(trainable, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def retriever_of(trees: dict, cfg, tokenizer, args, name: str):
    from llmjax.retrieval.dense import DenseRetriever

    query, doc = (trees["shared"], trees["shared"]) if "shared" in trees else (trees["query"], trees["doc"])
    return DenseRetriever(name, query, doc, cfg, tokenizer, "mean", args.query_max_len, args.doc_max_len)


def index_candidates(retriever, task, allowed: np.ndarray, pool: int, batch_size: int) -> np.ndarray:
    """[train queries, pool]: each training query's nearest allowed documents by the current model (positive out)."""
    from llmjax.retrieval.exact import ExactIndex

    vectors = retriever.embed_documents([task.documents[i] for i in allowed], batch_size=batch_size)
    index = ExactIndex(retriever.dim, "ip")
    index.add(np.arange(len(allowed)), vectors)
    queries = retriever.embed_queries(task.train_queries, batch_size=batch_size)
    _, rows = index.search(queries, min(pool + 1, len(allowed)))
    return drop_positives(allowed[rows], task.train_positives, pool)


# --- REALM ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RealmInputs:
    """The frozen LM and every document's and query's LM token ids, cut as the rows use them."""
    lm: object                   # llmjax.io.models.LoadedModel
    docs: list                   # [documents] int32 arrays: each document's first --lm-doc-tokens ids
    targets: list                # [documents] int32 arrays: each document's first --lm-target-tokens ids
    filler: int                  # the id rows are padded with (a newline)
    args: argparse.Namespace

    def rows(self, query_texts: list[str], doc_ids: np.ndarray, positives: np.ndarray):
        """(LM rows int32 [B, K, D + Q + T], target mask bool [B, T]): per query and retrieved document, the
        document, the query as a comment, then the code of the query's positive (padding scored nowhere)."""
        d, q, t = self.args.lm_doc_tokens, self.args.lm_query_tokens, self.args.lm_target_tokens
        tokenizer = self.lm.tokenizer
        rows = np.full((len(query_texts), doc_ids.shape[1], d + q + t), self.filler, np.int32)
        mask = np.zeros((len(query_texts), t), bool)
        for b, (text, positive) in enumerate(zip(query_texts, positives)):
            query = np.asarray(tokenizer.encode("\n# " + text.replace("\n", " ") + "\n"), np.int32)[-q:]
            target = self.targets[positive]
            rows[b, :, d + q - len(query):d + q] = query
            rows[b, :, d + q:d + q + len(target)] = target
            mask[b, :len(target)] = True
            for k, doc in enumerate(doc_ids[b]):
                piece = self.docs[doc] if doc >= 0 else np.zeros(0, np.int32)  # -1: no document
                rows[b, k, d - len(piece):d] = piece
        return rows, mask

    def log_likelihoods(self, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """log p(code | document, query) [B, K] (sequence) or per token [B, K, T] (token), padding zeroed."""
        from llmjax.retrieval.realm import retrieved_log_likelihoods

        per_token = retrieved_log_likelihoods(self.lm.params, self.lm.cfg, rows, self.args.lm_target_tokens,
                                              per_token=True) * mask[:, None, :]
        return per_token if self.args.marginal == "token" else per_token.sum(axis=-1)


def realm_inputs(task, args) -> RealmInputs:
    """Load --lm (frozen) and tokenize every document once for it."""
    from llmjax.io.models import load_model
    from llmjax.retrieval.base import RetrievalError
    from llmjax.retrieval.rag import parse_encoder_spec

    source, name = parse_encoder_spec(args.lm, "--lm")
    lm = load_model(**{source: name, "seed": args.train_seed})
    length = args.lm_doc_tokens + args.lm_query_tokens + args.lm_target_tokens
    if length - 1 > lm.cfg.max_seq_len:
        raise RetrievalError(f"--lm-doc-tokens + --lm-query-tokens + --lm-target-tokens = {length} exceed the LM's "
                             f"context of {lm.cfg.max_seq_len} + 1")
    ids = [np.asarray(lm.tokenizer.encode(text), np.int32) for text in task.documents]
    return RealmInputs(lm, [i[:args.lm_doc_tokens] for i in ids], [i[:args.lm_target_tokens] for i in ids],
                       int(lm.tokenizer.encode("\n")[-1]), args)


def realm_batch(inputs: RealmInputs, index, allowed: np.ndarray, query_vectors: np.ndarray, query_texts: list,
                positives: np.ndarray, args) -> dict:
    """The REALM part of a step's batch: top --realm-k allowed documents of each query (the index's rows are
    positions in `allowed`), their LM log-likelihoods and the target mask."""
    _, rows = index.search(query_vectors, min(args.realm_k, len(allowed)))
    doc_ids = allowed[rows]  # [B, K]
    lm_rows, mask = inputs.rows(query_texts, doc_ids, positives)
    return {"doc_ids": doc_ids, "lm_log_likelihood": inputs.log_likelihoods(lm_rows, mask), "target_mask": mask}


def rag_loss(retriever, inputs: RealmInputs, task, args) -> dict:
    """Held-out RAG loss in nats per code token: the first --realm-eval-queries test queries, their top --realm-k of
    the whole pool by `retriever` (None: the LM alone, no document), the marginal NLL of their code."""
    import jax.numpy as jnp

    from llmjax.retrieval.realm import marginal_nll, token_marginal_nll

    count = min(args.realm_eval_queries, len(task.test_queries))
    queries, positives = task.test_queries[:count], task.test_positives[:count]
    k = 1 if retriever is None else min(args.realm_k, len(task.documents))
    if retriever is None:
        scores, rows = np.zeros((count, 1), np.float32), np.full((count, 1), -1)
    else:
        index = retriever.index_documents(task.documents, batch_size=args.eval_batch_size)
        scores, rows = retriever.search(index, queries, k, batch_size=args.eval_batch_size)
    total, tokens = 0.0, 0
    for start in range(0, count, args.batch):
        part = slice(start, min(start + args.batch, count))
        lm_rows, mask = inputs.rows(queries[part], rows[part], positives[part])
        likelihood = inputs.log_likelihoods(lm_rows, mask)
        logits = jnp.asarray(scores[part] / args.temperature)
        nll = (token_marginal_nll(logits, likelihood, mask) if args.marginal == "token"
               else marginal_nll(logits, likelihood))
        total, tokens = total + float(nll.sum()), tokens + int(mask.sum())
    return {"rag_loss": total / max(tokens, 1), "rag_queries": count, "rag_k": k}


# --- the run ---------------------------------------------------------------------------------------------------


def plot_training(losses: list[tuple[int, float]], results: list[dict], path: Path,
                  curve: list[dict] | None = None, objective: str = "infonce") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmjax.experiments.retrieval_eval import recall_bars

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([s for s, _ in losses], [v for _, v in losses])
    left.set_xlabel("step")
    left.set_ylabel({"infonce": "InfoNCE loss", "realm": "REALM marginal NLL"}[objective] + " (training batches)")
    left.set_title("training loss", fontsize=9)
    if curve:
        twin = left.twinx()
        twin.plot([c["step"] for c in curve], [c["recall@10"] for c in curve], "o-", color="tab:orange")
        twin.set_ylabel("held-out recall@10", color="tab:orange")
    recall_bars(right, results, "held-out docstring -> code queries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from llmjax.config import ConfigError, TrainConfig
    from llmjax.experiments.retrieval_eval import METRICS, dense_ranking, evaluate, load_task, table
    from llmjax.io.models import ModelLoadError
    from llmjax.retrieval.base import RetrievalError
    from llmjax.retrieval.code_task import rank_metrics
    from llmjax.retrieval.dense import write_retriever
    from llmjax.train.optim import make_optimizer

    try:
        task = load_task(args)
        params, cfg, tokenizer = load_init(args)
        inputs = realm_inputs(task, args) if args.objective == "realm" else None
    except (RetrievalError, ModelLoadError, ConfigError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(task.summary())
    if args.batch > len(task.train_queries):
        print(f"{PROG}: error: --batch={args.batch} is larger than the {len(task.train_queries)} training queries",
              file=sys.stderr)
        return 2
    query_len, doc_len = min(args.query_max_len, cfg.max_seq_len), min(args.doc_max_len, cfg.max_seq_len)
    args.query_max_len, args.doc_max_len = query_len, doc_len
    k = min(100, len(task.documents))
    results, start_time = [evaluate("bm25", task)], time.perf_counter()
    trainable, frozen, lora_cfg = make_trainable(params, cfg, args)
    if not args.skip_start_eval:
        rows, seconds = dense_ranking(retriever_of(tower_trees(trainable, frozen, cfg, lora_cfg), cfg, tokenizer, args,
                                                   f"start ({args.init})"), task, k, args.eval_batch_size)
        results.append({"retriever": f"start ({args.init})", **rank_metrics(rows, task.test_positives),
                        "seconds": round(seconds, 2)})
        if inputs is not None:
            results[-1].update(rag_loss(retriever_of(tower_trees(trainable, frozen, cfg, lora_cfg), cfg, tokenizer,
                                                     args, "start"), inputs, task, args))
        print(table(results))
    lm_alone = rag_loss(None, inputs, task, args)["rag_loss"] if inputs is not None else None

    query_tokens, query_mask = tokenize_padded(tokenizer, task.train_queries, query_len)
    doc_tokens, doc_mask = tokenize_padded(tokenizer, task.documents, doc_len)
    allowed = np.flatnonzero(np.asarray(task.doc_splits) != "test")  # never a held-out module's code
    if args.num_hard >= len(allowed):
        print(f"{PROG}: error: --num-hard={args.num_hard} needs more than {len(allowed)} training and distractor "
              f"documents", file=sys.stderr)
        return 2
    candidates = None
    if args.hard_negatives == "bm25":
        candidates = bm25_candidates(task, allowed, args.hard_pool)

    train_cfg = TrainConfig(lr=args.lr, min_lr_ratio=0.0, warmup_steps=args.warmup, total_steps=args.steps,
                            schedule="cosine", weight_decay=args.weight_decay, beta2=0.999, grad_clip=1.0)
    optimizer = make_optimizer(train_cfg)
    opt_state = optimizer.init(trainable)
    step_fn = make_step(cfg, lora_cfg, optimizer, args)
    rng = np.random.default_rng(args.train_seed)
    order, cursor, losses = rng.permutation(len(task.train_queries)), 0, []
    curve = [] if args.skip_start_eval else [{"step": 0, **{m: results[1][m] for m in METRICS}}]
    from tqdm import tqdm

    if inputs is not None:
        from llmjax.embed import embed_tokens
        from llmjax.retrieval.contrastive import tower_params
        from llmjax.retrieval.exact import ExactIndex
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        if inputs is not None and step % args.refresh_every == 0:  # REALM: re-embed the documents, rebuild the index
            current = retriever_of(tower_trees(trainable, frozen, cfg, lora_cfg), cfg, tokenizer, args, "current")
            index = ExactIndex(current.dim, "ip")
            index.add(np.arange(len(allowed)), current.embed_documents([task.documents[i] for i in allowed],
                                                                       batch_size=args.eval_batch_size))
        if args.hard_negatives == "index" and step % args.refresh_every == 0:
            current = retriever_of(tower_trees(trainable, frozen, cfg, lora_cfg), cfg, tokenizer, args, "current")
            candidates = index_candidates(current, task, allowed, args.hard_pool, args.eval_batch_size)
        if cursor + args.batch > len(order):
            order, cursor = rng.permutation(len(task.train_queries)), 0
        picked = order[cursor: cursor + args.batch]
        cursor += args.batch
        positives = task.train_positives[picked]
        doc_ids = positives[:, None]
        if args.num_hard:
            doc_ids = np.concatenate([doc_ids, sample_hard(candidates, picked, positives, allowed, args.num_hard,
                                                           rng)], axis=1)  # [B, 1 + M]
        if inputs is not None:  # the top --realm-k by the current query tower, scored by the frozen LM
            vectors = np.asarray(embed_tokens(tower_params(trainable, frozen, "query", cfg, lora_cfg),
                                              query_tokens[picked], query_mask[picked], cfg))
            realm = realm_batch(inputs, index, allowed, vectors, [task.train_queries[i] for i in picked], positives,
                                args)
            doc_ids = realm.pop("doc_ids")
        batch = {"query_tokens": query_tokens[picked], "query_mask": query_mask[picked],
                 "doc_tokens": doc_tokens[doc_ids], "doc_mask": doc_mask[doc_ids], "doc_ids": doc_ids.astype(np.int32)}
        if inputs is not None:
            batch.update(realm)
        trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, batch)
        if step % args.log_every == 0 or step == args.steps - 1:
            losses.append((step, float(loss)))
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            current = retriever_of(tower_trees(trainable, frozen, cfg, lora_cfg), cfg, tokenizer, args, "current")
            rows, _ = dense_ranking(current, task, k, args.eval_batch_size)
            curve.append({"step": step + 1, **rank_metrics(rows, task.test_positives)})
            bar.write(f"step {step + 1}: held-out recall@10 {curve[-1]['recall@10']:.3f}")
            args.out.mkdir(parents=True, exist_ok=True)  # what is known so far, should the run be cut short
            (args.out / "progress.json").write_text(json.dumps({"results": results, "losses": losses,
                                                                 "curve": curve}, indent=1))
    train_seconds = time.perf_counter() - start_time

    trees = jax.device_get(tower_trees(trainable, frozen, cfg, lora_cfg))
    extra = {"init": args.init, "hard_negatives": args.hard_negatives, "lora_rank": args.lora_rank,
             "steps": args.steps, "batch": args.batch}
    write_retriever(args.out, trees, cfg, tokenizer, pooling="mean", query_max_len=query_len, doc_max_len=doc_len,
                    extra=extra)
    rows, seconds = dense_ranking(retriever_of(trees, cfg, tokenizer, args, str(args.out)), task, k,
                                  args.eval_batch_size)
    results.append({"retriever": "trained", **rank_metrics(rows, task.test_positives), "seconds": round(seconds, 2)})
    curve.append({"step": args.steps, **{m: results[-1][m] for m in METRICS}})
    print(table(results))
    if inputs is not None:
        results[-1].update(rag_loss(retriever_of(trees, cfg, tokenizer, args, "trained"), inputs, task, args))
        print(f"held-out RAG loss (nats / code token, top {args.realm_k}): "
              + ", ".join(f"{r['retriever']} {r['rag_loss']:.4f}" for r in results if "rag_loss" in r)
              + f"; the LM without retrieval {lm_alone:.4f}")
    record = {"task": task.summary(), "test_queries": len(task.test_queries), "documents": len(task.documents),
              "device": jax.devices()[0].device_kind, "results": results, "losses": losses, "curve": curve,
              "train_seconds": round(train_seconds, 1), "flags": {k: str(v) for k, v in vars(args).items()},
              "objective": args.objective, "lm_alone_rag_loss": lm_alone,
              "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])}
    (args.out / "metrics.json").write_text(json.dumps(record, indent=1))
    plot_training(losses, results, args.out / "training.png", curve if len(curve) > 1 else None, args.objective)
    print(f"wrote {args.out} (retriever.json, checkpoint/, metrics.json, training.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
