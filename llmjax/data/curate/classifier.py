"""A small learned quality classifier: hashed word n-gram features + logistic regression (JAX, optax).

Features: four document statistics (distinct word 2-gram share, letter share, ordinary-length
word share, a constant) and the text's lowercased word 1- and 2-grams (the vectorized word
hashes of `minhash`) hashed into the other buckets, counts scaled to unit L2 norm, kept sparse as (document, bucket,
value) triples; the logit is segment_sum(w[bucket] * value) + b. Trained full-batch with Adam
on the logistic loss + L2; prediction is NumPy only (cheap in worker processes).

Training data built offline (`default_training_texts`): positives are the standard library's
docstrings of 20+ words (English prose); negatives are the same prose degraded four ways:
words shuffled, lines repeated, random symbols mixed in, keyboard noise. Saved / loaded as .npz.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmjax.data.curate.minhash import SHINGLE_MIX, word_hashes

DEFAULT_DIM = 1 << 16


class ClassifierError(ValueError):
    """A classifier file that cannot be used, or training data that cannot train."""


@dataclass(frozen=True)
class QualityClassifier:
    weights: np.ndarray  # [dim] float32
    bias: float
    threshold: float = 0.5

    @property
    def dim(self) -> int:
        return len(self.weights)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """[documents] P(good quality)."""
        rows, columns, values = hashed_features(texts, self.dim)
        logits = np.bincount(rows, weights=self.weights[columns] * values, minlength=len(texts)) + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    def keep(self, texts: Sequence[str]) -> np.ndarray:
        return self.probabilities(texts) >= self.threshold

    def save(self, path: str | Path) -> None:
        np.savez(path, weights=self.weights, bias=np.float64(self.bias), threshold=np.float64(self.threshold))


def load_classifier(path: str | Path) -> QualityClassifier:
    try:
        with np.load(path) as data:
            return QualityClassifier(data["weights"].astype(np.float32), float(data["bias"]), float(data["threshold"]))
    except (OSError, KeyError, ValueError) as error:
        raise ClassifierError(f"cannot read the quality classifier {path}: {error}; train one with "
                              "`python -m experiments curate --classifier PATH` (a missing PATH is trained)") from None


DENSE_FEATURES = 4  # buckets 0..3 hold document statistics; the hashed n-grams use the rest


def document_statistics(text: str, words: np.ndarray, grams: np.ndarray) -> np.ndarray:
    """[4] float32: distinct share of word 2-grams (low for repeated lines), share of letters and
    spaces among characters (low for symbol noise), share of words of 2-12 characters, a bias-like 1."""
    pairs = grams[len(words):]
    distinct_pairs = len(np.unique(pairs)) / len(pairs) if len(pairs) else 1.0
    letters = sum(c.isalpha() or c.isspace() for c in text) / len(text) if text else 0.0
    lengths = np.array([len(w) for w in text.split()]) if text.split() else np.zeros(1)
    ordinary = float(np.mean((lengths >= 2) & (lengths <= 12)))
    return np.array([distinct_pairs, letters, ordinary, 1.0], dtype=np.float32)


def document_features(text: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(buckets, values): 4 document statistics, then word 1- and 2-gram counts hashed into the
    other dim - 4 buckets, L2-normalized."""
    if dim <= DENSE_FEATURES:
        raise ClassifierError(f"dim must be more than {DENSE_FEATURES}, got {dim}")
    words = word_hashes(text)
    grams = np.concatenate([words, words[:-1] * SHINGLE_MIX + words[1:]]) if len(words) else words
    hashed = (grams * SHINGLE_MIX >> np.uint64(40)) % np.uint64(dim - DENSE_FEATURES) + np.uint64(DENSE_FEATURES)
    buckets, counts = np.unique(hashed, return_counts=True)
    values = counts / np.sqrt(np.sum(counts.astype(np.float64) ** 2)) if len(counts) else counts.astype(np.float64)
    return (np.concatenate([np.arange(DENSE_FEATURES), buckets.astype(np.int64)]),
            np.concatenate([document_statistics(text, words, grams), values.astype(np.float32)]))


def hashed_features(texts: Sequence[str], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns, values): a sparse [documents, dim] feature matrix as triples."""
    parts = [document_features(t, dim) for t in texts]
    rows = np.concatenate([np.full(len(b), i, np.int64) for i, (b, _) in enumerate(parts)] + [np.zeros(0, np.int64)])
    columns = np.concatenate([b for b, _ in parts] + [np.zeros(0, np.int64)])
    values = np.concatenate([v for _, v in parts] + [np.zeros(0, np.float32)])
    return rows, columns, values


def train_classifier(positives: Sequence[str], negatives: Sequence[str], dim: int = DEFAULT_DIM, steps: int = 400,
                     learning_rate: float = 0.1, l2: float = 1e-4, threshold: float = 0.5) -> QualityClassifier:
    """Logistic regression on hashed features, full batch, Adam (optax), in JAX."""
    import jax
    import jax.numpy as jnp
    import optax

    if not positives or not negatives:
        raise ClassifierError(f"training needs positives and negatives, got {len(positives)} and {len(negatives)}")
    texts = list(positives) + list(negatives)
    labels = jnp.asarray([1.0] * len(positives) + [0.0] * len(negatives), dtype=jnp.float32)  # [documents]
    rows, columns, values = (jnp.asarray(a) for a in hashed_features(texts, dim))
    params = {"weights": jnp.zeros(dim, jnp.float32), "bias": jnp.zeros((), jnp.float32)}
    optimizer = optax.adam(learning_rate)

    def loss_fn(params):
        logits = jax.ops.segment_sum(params["weights"][columns] * values, rows, num_segments=len(texts))
        logits = logits + params["bias"]  # [documents]
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels)) + l2 * jnp.sum(params["weights"] ** 2)

    @jax.jit
    def train(params):
        def step(carry, _):
            params, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
        return params, losses

    params, _ = train(params)
    return QualityClassifier(np.asarray(params["weights"], np.float32), float(params["bias"]), threshold)


# --- training data built offline --------------------------------------------------------------------


def docstrings(paths: Sequence[Path], min_words: int = 20, limit: int | None = None) -> list[str]:
    """Module, class and function docstrings of at least min_words words, in file order."""
    found = []
    for path in paths:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    found.append(doc)
                    if limit is not None and len(found) >= limit:
                        return found
    return found


def shuffled_words(text: str, rng: np.random.Generator) -> str:
    words = text.split()
    return " ".join(words[i] for i in rng.permutation(len(words)))


def repeated_lines(text: str, rng: np.random.Generator) -> str:
    lines = [line for line in text.splitlines() if line.strip()] or [text]
    line = lines[int(rng.integers(len(lines)))]
    return "\n".join([line] * int(rng.integers(5, 15)))


def random_symbols(text: str, rng: np.random.Generator) -> str:
    symbols = list("#$%&*+<>=@^|~{}[]\\/")
    words = text.split()
    return " ".join(w if rng.random() < 0.5 else "".join(rng.choice(symbols, size=int(rng.integers(1, 6))))
                    for w in words)


def keyboard_noise(text: str, rng: np.random.Generator) -> str:
    keys = list("qwertyuiopasdfghjklzxcvbnm")
    length = max(20, len(text.split()))
    return " ".join("".join(rng.choice(keys, size=int(rng.integers(2, 9)))) for _ in range(length))


DEGRADATIONS = (shuffled_words, repeated_lines, random_symbols, keyboard_noise)


def degraded(texts: Sequence[str], seed: int = 0) -> list[str]:
    """One degraded copy of each text, the degradations taken in turn."""
    rng = np.random.default_rng(seed)
    return [DEGRADATIONS[i % len(DEGRADATIONS)](text, rng) for i, text in enumerate(texts)]


def default_training_texts(limit: int = 2000, seed: int = 0) -> tuple[list[str], list[str]]:
    """(positives, negatives): standard-library docstrings and their degraded copies."""
    from llmjax.data.corpus import default_corpus_files

    positives = docstrings(default_corpus_files(), limit=limit)
    return positives, degraded(positives, seed)
