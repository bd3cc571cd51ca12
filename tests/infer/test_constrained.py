"""Constrained generation: the byte DFA agrees with Python's `re`; thousands of sampled outputs (one
jitted batch, random seeds) all match their regex / validate against their schema; bad patterns fail
before generating."""

import json
import re

import numpy as np
import pytest

from llmjax.infer import constrained as C
from llmjax.infer.generate import generate
from llmjax.infer.sampling import SamplingConfig

PATTERNS = [
    r"[0-9]{3}-[a-z]+",
    r"(foo|bar)+\d?",
    r"\w+@\w+\.(com|org)",
    r"(?:x|yz)*é[^a\d]{1,3}$",
]
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                                      "n": {"type": "integer"}}, "required": ["name", "n"]},
    {"type": "array", "items": {"anyOf": [{"type": "number"}, {"enum": ["a", None, 3]}]}, "minItems": 1, "maxItems": 3},
]


def fullmatch(dfa: C.ByteDFA, text: str) -> bool:
    state = dfa.initial
    for byte in text.encode("utf-8"):
        state = dfa.transitions[state, byte]
        if state < 0:
            return False
    return bool(dfa.accepting[state])


@pytest.mark.parametrize("pattern", PATTERNS + [r"a.b|[^\s]c?", r"(ab){2,3}|\Wz"])
def test_dfa_agrees_with_python_re(pattern):
    dfa = C.compile_regex(pattern)
    rng = np.random.default_rng(0)
    alphabet = list("abfoxyz019-@.é€ \n_c")
    python = re.compile(pattern.rstrip("$"), re.ASCII)  # our \d \w \s are ASCII, like re.ASCII
    for length in range(0, 9):
        for _ in range(150):
            text = "".join(rng.choice(alphabet, length))
            assert fullmatch(dfa, text) == (python.fullmatch(text) is not None), (pattern, text)


def valid(value, schema) -> bool:
    """A small JSON-schema validator for the keywords constrained.py supports."""
    if "enum" in schema:
        return value in schema["enum"]
    if "anyOf" in schema:
        return any(valid(value, s) for s in schema["anyOf"])
    kind = schema["type"]
    if kind == "object":
        return (isinstance(value, dict) and set(schema.get("required", [])) <= set(value)
                and all(valid(value[k], s) for k, s in schema["properties"].items() if k in value))
    if kind == "array":
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1e9)
                and all(valid(v, schema["items"]) for v in value))
    if kind == "string":
        return isinstance(value, str) and schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1e9)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    return value is None


def test_thousands_of_samples_all_match(bpe, bpe_model):
    params, cfg = bpe_model
    vocab = cfg.padded_vocab_size
    automata = [C.regex_automaton(p, bpe, vocab) for p in PATTERNS]
    automata += [C.json_schema_automaton(s, bpe, vocab) for s in SCHEMAS]
    rows = 2048
    constraint = [automata[i % len(automata)] for i in range(rows)]
    sampling = [SamplingConfig(temperature=1.5, seed=i) for i in range(rows)]
    out = generate(params, cfg, [bpe.encode("x = ")] * rows, max_new_tokens=24, constraint=constraint,
                   eos_id=bpe.eot_id, sampling=sampling)
    failures = []
    for i, tokens in enumerate(out.tokens):
        if tokens and tokens[-1] == bpe.eot_id:
            tokens = tokens[:-1]
        text = bpe.decode_bytes(tokens).decode("utf-8")
        which = i % len(automata)
        if which < len(PATTERNS):
            ok = re.fullmatch(PATTERNS[which].rstrip("$"), text, re.ASCII) is not None
        else:
            try:
                ok = valid(json.loads(text), SCHEMAS[which - len(PATTERNS)])
            except json.JSONDecodeError:
                ok = False
        if not ok:
            failures.append((which, text))
    assert not failures, failures[:5]
    assert len({tuple(t) for t in out.tokens}) > rows // 4  # the seeds give varied outputs


def test_forced_prefix_then_allowed_set(bpe_model):
    params, cfg = bpe_model
    vocab = cfg.padded_vocab_size
    automaton = C.forced_prefix_automaton([10, 11, 12], vocab, allowed=[40, 41, 42])
    out = generate(params, cfg, [[1, 2]] * 8, max_new_tokens=9, constraint=automaton,
                   sampling=[SamplingConfig(seed=s) for s in range(8)])
    for tokens in out.tokens:
        assert tokens[:3] == [10, 11, 12] and set(tokens[3:]) <= {40, 41, 42} and len(tokens) == 9
    only = C.allowed_tokens_automaton([7, 8], vocab)
    assert set(sum(generate(params, cfg, [[1]], max_new_tokens=5, constraint=only).tokens, [])) <= {7, 8}


@pytest.mark.parametrize("make,message", [
    (lambda tok, v: C.regex_automaton(r"a[^\s\S]b", tok, v), "unsatisfiable"),
    (lambda tok, v: C.json_schema_automaton({"enum": []}, tok, v), "unsatisfiable"),
    (lambda tok, v: C.json_schema_automaton({"type": "string", "pattern": "a+"}, tok, v), "not supported: pattern"),
    (lambda tok, v: C.json_schema_automaton("{not json", tok, v), "not valid JSON"),
    (lambda tok, v: C.regex_automaton(r"(?=a)b", tok, v), "lookarounds"),
    (lambda tok, v: C.regex_automaton(r"a(b", tok, v), r"missing \)"),
    (lambda tok, v: C.regex_automaton(r"*a", tok, v), "nothing to repeat"),
])
def test_bad_constraints_fail_before_generating(bpe, make, message):
    with pytest.raises(C.ConstraintError, match=message):
        make(bpe, 448)


def test_too_few_tokens_for_the_pattern_is_an_error(bpe, bpe_model):
    params, cfg = bpe_model
    automaton = C.regex_automaton("(é€){6}", bpe, cfg.padded_vocab_size)
    with pytest.raises(C.ConstraintError, match="needs at least"):
        generate(params, cfg, [[1]], max_new_tokens=3, constraint=automaton)


def test_stop_automaton_matches_across_tokens(bpe):
    stop = C.stop_string_automaton(["ab", "\n\n"], bpe, 448)
    state, hits = 0, []
    for token in bpe.encode("xa") + bpe.encode("b\n") + bpe.encode("\nz"):
        hits.append(bool(stop.hit[state, token]))
        state = stop.next[state, token]
    assert any(hits)
