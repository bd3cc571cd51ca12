"""MinHash-LSH (llmjax.data.curate.minhash) against exact Jaccard and the LSH collision formula."""

import numpy as np
import pytest

from llmjax.data.curate import minhash


def random_set_pair(rng, size, jaccard):
    """Two sets of integer shingles (< 2^32) with the given exact Jaccard (rounded to whole elements)."""
    union = rng.choice(1 << 32, size=size, replace=False).astype(np.uint64)
    shared = int(round(jaccard * size))
    rest = size - shared
    a = np.concatenate([union[:shared], union[shared: shared + rest // 2]])
    b = np.concatenate([union[:shared], union[shared + rest // 2:]])
    return a, b, shared / size


def exact(a, b):
    return minhash.exact_jaccard(set(a.tolist()), set(b.tolist()))


def test_signature_estimate_within_statistical_bound():
    rng = np.random.default_rng(0)
    num_perm = 256
    errors = []
    for similarity in (0.1, 0.3, 0.5, 0.8, 0.95):
        for _ in range(8):
            a, b, _ = random_set_pair(rng, 400, similarity)
            truth = exact(a, b)
            signature = minhash.signatures([a, b], num_perm, seed=int(rng.integers(1 << 30)))
            estimate = minhash.estimated_jaccard(signature[0], signature[1])
            bound = np.sqrt(truth * (1 - truth) / num_perm)
            assert abs(estimate - truth) <= 4.5 * bound + 1e-9, (similarity, estimate, truth)
            errors.append((estimate - truth) / max(bound, 1e-9))
    assert abs(np.mean(errors)) < 1.0  # unbiased: the mean z-score is near 0


def test_signatures_match_a_plain_loop():
    rng = np.random.default_rng(1)
    shingles = [rng.integers(0, 1 << 32, size=n, dtype=np.uint64) for n in (5, 0, 300, 1)]
    got = minhash.signatures(shingles, 16, seed=3)
    a, b = minhash.permutations(16, seed=3)
    for doc, values in enumerate(shingles):
        for i in range(16):
            expected = min(((int(a[i]) * int(x) + int(b[i])) % (1 << 64)) >> 32 for x in values.tolist()) \
                if len(values) else (1 << 32) - 1
            assert got[doc, i] == expected


def test_band_collision_probability_matches_formula():
    rng = np.random.default_rng(2)
    bands, rows, pairs = 8, 4, 150
    for similarity in (0.4, 0.6, 0.8):
        collided = 0
        for trial in range(pairs):
            a, b, s = random_set_pair(rng, 200, similarity)
            signature = minhash.signatures([a, b], bands * rows, seed=trial)
            collided += len(minhash.candidate_pairs(signature, bands, rows)) > 0
        expected = minhash.collision_probability(s, bands, rows)
        std = np.sqrt(expected * (1 - expected) / pairs)
        assert abs(collided / pairs - expected) <= 4 * std + 0.03, (similarity, collided / pairs, expected)


def test_optimal_bands_fit_the_threshold():
    bands, rows = minhash.optimal_bands(0.8, 128)
    assert bands * rows <= 128
    assert minhash.collision_probability(0.9, bands, rows) > 0.9
    assert minhash.collision_probability(0.5, bands, rows) < 0.1
    assert minhash.optimal_bands(0.5, 128)[1] < rows  # a lower threshold needs fewer rows per band


@pytest.mark.parametrize("verify", ["exact", "estimate"])
def test_near_duplicates_found_and_first_kept(verify):
    base = " ".join(f"word{i}" for i in range(300))
    edited = base.replace("word150", "changed")
    other = " ".join(f"other{i}" for i in range(300))
    half = " ".join(f"word{i}" for i in range(150)) + " " + " ".join(f"new{i}" for i in range(150))  # Jaccard ~0.33
    config = minhash.MinHashConfig(threshold=0.8, verify=verify)
    assert minhash.dedup_texts([base, half], config).tolist() == [True, True]
    keep = minhash.dedup_texts([other, base, edited, other], config)
    assert keep.tolist() == [True, True, False, False]


def test_shingles_word_and_char():
    assert len(minhash.shingle_hashes("a b c d e f", ngram=5)) == 2
    assert len(minhash.shingle_hashes("A b", ngram=5)) == 1  # shorter than n: one shingle
    assert np.array_equal(minhash.shingle_hashes("Hello, World"), minhash.shingle_hashes("hello world"))
    assert len(minhash.shingle_hashes("abcabc", ngram=3, unit="char")) == 3
    assert len(minhash.shingle_hashes("", ngram=3)) == 0
    assert minhash.shingle_hashes("x y z w v u", 2).max() < 1 << 32


def test_parallel_signatures_equal_serial():
    texts = [f"document {i} " + " ".join(f"w{j % (i + 3)}" for j in range(50)) for i in range(12)]
    config = minhash.MinHashConfig(num_perm=32)
    serial = minhash.text_signatures(texts, config)
    assert np.array_equal(minhash.parallel_signatures(texts, config, workers=2, batch_characters=200), serial)


@pytest.mark.parametrize("kwargs, field", [({"ngram": 0}, "ngram"), ({"num_perm": 1}, "num_perm"),
                                           ({"threshold": 1.0}, "threshold"), ({"bands": 7}, "bands"),
                                           ({"unit": "byte"}, "unit"), ({"verify": "both"}, "verify"),
                                           ({"false_negative_weight": 1.0}, "false_negative_weight")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(minhash.MinHashError, match=field):
        minhash.MinHashConfig(**kwargs)
