"""The hashed n-gram logistic-regression quality classifier: separates held-out synthetic data, saves / loads."""

import numpy as np
import pytest

from llmjax.data.curate import classifier

PROSE = [
    "Return the number of items in the container, counting each element once even when it repeats.",
    "This module provides functions for reading and writing files in a portable way across platforms.",
    "Raise an error when the argument is not a valid path, so that the caller can report the problem.",
    "The scheduler decides which task runs next, based on its priority and the time it has waited.",
    "Convert the given string to lower case and strip surrounding white space before comparing it.",
    "A simple class that stores configuration values read from a file and validates each of them.",
    "When the connection is closed by the server, the client retries a few times before giving up.",
    "Compute the checksum of the data in blocks, which keeps memory use small for very large inputs.",
    "The parser reads tokens one at a time and builds a tree that later stages of the compiler use.",
    "Open the database, create the tables if they are missing, and return a cursor for the queries.",
    "Format the date according to the locale of the user, falling back to the standard format here.",
    "This function waits until all worker threads have finished and then collects their results.",
]


def test_classifier_separates_held_out_synthetic_data(tmp_path):
    # standard-library docstrings vs their degraded copies; the test documents are held out
    positives, negatives = classifier.default_training_texts(limit=300)
    model = classifier.train_classifier(positives[:200], negatives[:200], dim=1 << 13)
    test_pos, test_neg = positives[200:], negatives[200:]
    p_good = model.probabilities(test_pos)
    p_bad = model.probabilities(test_neg)
    accuracy = (np.sum(p_good >= 0.5) + np.sum(p_bad < 0.5)) / (len(test_pos) + len(test_neg))
    assert accuracy >= 0.8, (p_good, p_bad)
    assert np.mean(p_bad[1::4] < 0.5) >= 0.9 and np.mean(p_bad[3::4] < 0.5) >= 0.9  # repeated lines, keyboard noise
    assert p_good.mean() > p_bad.mean() + 0.3
    # the NumPy prediction equals a dense float64 reference
    rows, columns, values = classifier.hashed_features(test_pos, model.dim)
    dense = np.zeros((len(test_pos), model.dim))
    np.add.at(dense, (rows, columns), values)
    reference = 1 / (1 + np.exp(-(dense @ model.weights.astype(np.float64) + model.bias)))
    np.testing.assert_allclose(p_good, reference, rtol=1e-5)
    # save / load round trip
    model.save(tmp_path / "q.npz")
    loaded = classifier.load_classifier(tmp_path / "q.npz")
    np.testing.assert_array_equal(loaded.weights, model.weights)
    assert loaded.keep(test_pos).tolist() == model.keep(test_pos).tolist()


def test_features_are_unit_norm_and_stable():
    dense = classifier.DENSE_FEATURES
    buckets, values = classifier.document_features("Hello hello world", 1024)
    assert buckets[:dense].tolist() == list(range(dense)) and (buckets[dense:] >= dense).all()
    assert np.isclose(np.sum(values[dense:].astype(np.float64) ** 2), 1.0)
    # statistics: 2 distinct of 2 bigrams, all letters / spaces, all words of ordinary length
    np.testing.assert_allclose(values[:dense], [1.0, 1.0, 1.0, 1.0])
    again = classifier.document_features("HELLO, hello world!", 1024)
    assert np.array_equal(buckets, again[0]) and np.allclose(values[dense:], again[1][dense:])
    repeated = classifier.document_features("a b a b a b a b", 1024)[1]
    assert repeated[0] == pytest.approx(2 / 7)  # distinct bigrams: (a b), (b a) of 7


def test_degradations_change_the_text():
    rng = np.random.default_rng(0)
    for degrade in classifier.DEGRADATIONS:
        assert degrade(PROSE[0], rng) != PROSE[0]


def test_bad_inputs(tmp_path):
    with pytest.raises(classifier.ClassifierError, match="positives"):
        classifier.train_classifier([], ["x"])
    (tmp_path / "bad.npz").write_bytes(b"not a file")
    with pytest.raises(classifier.ClassifierError, match="bad.npz"):
        classifier.load_classifier(tmp_path / "bad.npz")
