"""Constrained generation: outputs guaranteed to match a regular expression or a JSON schema.

    automaton = regex_automaton(r"[0-9]{3}-[a-z]+", tokenizer, cfg.padded_vocab_size)
    automaton = json_schema_automaton({"type": "object", "properties": {...}}, tokenizer, cfg.padded_vocab_size)
    generate(params, cfg, prompts, constraint=automaton, eos_id=tokenizer.eot_id, max_new_tokens=64)

How: the pattern is parsed into a byte-level NFA (UTF-8: a character class becomes byte sequences),
determinized and minimized into a DFA over bytes, then lifted to a *token* automaton over the
tokenizer's vocabulary: next[state, token] is the DFA state after the token's bytes, or -1 when a byte
leads nowhere. Each step the generation loop masks every token whose next state is -1, and also every
token whose next state cannot reach acceptance within the tokens left (`distance`, the fewest tokens to
an accepting state, by breadth-first search): so a row always ends accepted, even when it runs out of
tokens. EOS is allowed exactly in accepting states. A pattern that no string (or no string of at most
max_new_tokens tokens) satisfies is an error before anything is generated.

Regex syntax: literals, `.`, classes `[a-z\\d]` / `[^...]`, escapes `\\d \\w \\s \\D \\W \\S` (ASCII, as with re.ASCII), `\\n \\t ...`,
groups `( )` / `(?: )`, `|`, quantifiers `* + ? {m} {m,} {m,n}` (lazy forms accepted, same language);
the whole output must match (anchors `^ $` at the ends are accepted and ignored).
JSON schema: type string / integer / number / boolean / null / array / object, enum, const, anyOf /
oneOf, minLength / maxLength, minItems / maxItems, properties (emitted in order, all of them),
compact JSON (no whitespace). Unsupported keywords are an error naming them.

The same machinery gives `stop_string_automaton` (Aho-Corasick over bytes, lifted to tokens, so a stop
string split across tokens still matches), and the simple `allowed_tokens_automaton` /
`forced_prefix_automaton`.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

UNREACHABLE = np.iinfo(np.int32).max // 2


class ConstraintError(ValueError):
    """A regex / schema that cannot be used: bad syntax, unsupported feature, or no string satisfies it."""


# --- regex -> byte NFA ---------------------------------------------------------------------------

ALL_BYTES = (1 << 256) - 1
MAX_CODEPOINT = 0x10FFFF


def _byte_set(*ranges) -> int:
    mask = 0
    for lo, hi in ranges:
        mask |= ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)
    return mask


def _utf8_sequences(lo: int, hi: int):
    """Byte-range sequences [(lo, hi), ...] whose concatenations are the UTF-8 encodings of [lo, hi]."""
    if lo > hi:
        return
    for a, b in ((0xD800, 0xDFFF),):  # surrogates have no UTF-8 encoding
        if lo <= b and hi >= a:
            yield from _utf8_sequences(lo, a - 1)
            yield from _utf8_sequences(b + 1, hi)
            return
    for boundary in (0x7F, 0x7FF, 0xFFFF):
        if lo <= boundary < hi:
            yield from _utf8_sequences(lo, boundary)
            yield from _utf8_sequences(boundary + 1, hi)
            return
    if hi <= 0x7F:
        yield [(lo, hi)]
        return
    length = len(chr(lo).encode("utf-8"))
    for i in range(1, length):
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                yield from _utf8_sequences(lo, lo | m)
                yield from _utf8_sequences((lo | m) + 1, hi)
                return
            if hi & m != m:
                yield from _utf8_sequences(lo, (hi & ~m) - 1)
                yield from _utf8_sequences(hi & ~m, hi)
                return
    yield list(zip(chr(lo).encode("utf-8"), chr(hi).encode("utf-8")))


# AST: ("set", byte mask) | ("seq", [nodes]) | ("alt", [nodes]) | ("repeat", node, min, max | None)
EMPTY = ("seq", [])


def _codepoint_node(ranges: list[tuple[int, int]]) -> tuple:
    """A node matching one character whose code point is in the ranges."""
    ascii_mask, alternatives = 0, []
    for lo, hi in ranges:
        if lo <= 0x7F:
            ascii_mask |= _byte_set((lo, min(hi, 0x7F)))
        for sequence in _utf8_sequences(max(lo, 0x80), hi):
            alternatives.append(("seq", [("set", _byte_set(r)) for r in sequence]))
    if ascii_mask:
        alternatives.insert(0, ("set", ascii_mask))
    if not alternatives:
        return ("set", 0)  # matches nothing
    return alternatives[0] if len(alternatives) == 1 else ("alt", alternatives)


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, start = [], 0
    for lo, hi in sorted(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = max(start, hi + 1)
    if start <= MAX_CODEPOINT:
        out.append((start, MAX_CODEPOINT))
    return out


DIGIT = [(0x30, 0x39)]
WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
SPACE = [(0x09, 0x0D), (0x20, 0x20)]
CLASS_ESCAPES = {"d": DIGIT, "w": WORD, "s": SPACE, "D": _complement(DIGIT), "W": _complement(WORD),
                 "S": _complement(SPACE)}
CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


class _Parser:
    def __init__(self, pattern: str):
        self.pattern, self.i = pattern, 0

    def error(self, message: str) -> ConstraintError:
        return ConstraintError(f"regex {self.pattern!r}: {message} at position {self.i}")

    def peek(self):
        return self.pattern[self.i] if self.i < len(self.pattern) else None

    def take(self):
        char = self.peek()
        if char is None:
            raise self.error("unexpected end")
        self.i += 1
        return char

    def parse(self):
        if self.peek() == "^":
            self.i += 1
        node = self.alternation()
        if self.peek() is not None:
            raise self.error(f"unexpected {self.peek()!r}")
        return node

    def alternation(self):
        options = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else ("alt", options)

    def sequence(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            if self.peek() == "$" and self.i == len(self.pattern) - 1:
                self.i += 1
                break
            items.append(self.quantified(self.atom()))
        return ("seq", items)

    def quantified(self, node):
        while True:
            char = self.peek()
            if char in ("*", "+", "?"):
                self.i += 1
                node = ("repeat", node, {"*": 0, "+": 1, "?": 0}[char], {"*": None, "+": None, "?": 1}[char])
            elif char == "{" and re.match(r"\{\d+(,\d*)?\}", self.pattern[self.i:]):
                body = re.match(r"\{(\d+)(,(\d*))?\}", self.pattern[self.i:])
                self.i += body.end()
                low = int(body.group(1))
                high = low if body.group(2) is None else (int(body.group(3)) if body.group(3) else None)
                if high is not None and high < low:
                    raise self.error(f"bad repeat {{{low},{high}}}")
                node = ("repeat", node, low, high)
            else:
                return node
            if self.peek() in ("?", "+"):  # lazy / possessive: the same language
                self.i += 1

    def atom(self):
        char = self.take()
        if char == "(":
            if self.pattern.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.error("lookarounds and group flags are not supported")
            node = self.alternation()
            if self.peek() != ")":
                raise self.error("missing )")
            self.i += 1
            return node
        if char == "[":
            return _codepoint_node(self.char_class())
        if char == ".":
            return _codepoint_node(_complement([(0x0A, 0x0A)]))
        if char == "\\":
            return self.escape(in_class=False)
        if char in "*+?{":
            if char == "{":
                return _literal(char)
            raise self.error(f"nothing to repeat before {char!r}")
        if char == ")":
            raise self.error("unbalanced )")
        return _literal(char)

    def escape(self, *, in_class: bool):
        char = self.take()
        if char in CLASS_ESCAPES:
            ranges = CLASS_ESCAPES[char]
            return ranges if in_class else _codepoint_node(ranges)
        if char == "x":
            text = self.pattern[self.i:self.i + 2]
            self.i += 2
            value = chr(int(text, 16))
        elif char == "u":
            text = self.pattern[self.i:self.i + 4]
            self.i += 4
            value = chr(int(text, 16))
        elif char in CHAR_ESCAPES:
            value = CHAR_ESCAPES[char]
        elif char.isalnum():
            raise self.error(f"unsupported escape \\{char}")
        else:
            value = char
        return [(ord(value), ord(value))] if in_class else _literal(value)

    def char_class(self):
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges, first = [], True
        while True:
            char = self.take()
            if char == "]" and not first:
                break
            first = False
            if char == "\\":
                items = self.escape(in_class=True)
                if len(items) != 1 or items[0][0] != items[0][1]:
                    ranges.extend(items)
                    continue
                low = items[0][0]
            elif char == "[" and self.peek() == ":":
                raise self.error("POSIX classes are not supported")
            else:
                low = ord(char)
            if self.peek() == "-" and self.pattern[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                high_char = self.take()
                high = self.escape(in_class=True)[0][0] if high_char == "\\" else ord(high_char)
                if high < low:
                    raise self.error(f"bad range {chr(low)!r}-{chr(high)!r}")
                ranges.append((low, high))
            else:
                ranges.append((low, low))
        return _complement(ranges) if negate else ranges


def _literal(text: str):
    return ("seq", [("set", 1 << b) for b in text.encode("utf-8")])


class _NFA:
    """Thompson NFA over bytes: edges[state] = [(byte mask, target)], eps[state] = [targets]."""

    def __init__(self):
        self.edges, self.eps = [], []

    def state(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def build(self, node, start: int) -> int:
        """Add `node` from `start`; return its end state."""
        kind = node[0]
        if kind == "set":
            end = self.state()
            if node[1]:
                self.edges[start].append((node[1], end))
            return end
        if kind == "seq":
            for child in node[1]:
                start = self.build(child, start)
            return start
        if kind == "alt":
            end = self.state()
            for child in node[1]:
                branch = self.state()
                self.eps[start].append(branch)
                self.eps[self.build(child, branch)].append(end)
            return end
        _, child, low, high = node
        if low > 1000 or (high or 0) > 1000:
            raise ConstraintError("repeat counts above 1000 are not supported")
        for _ in range(low):
            start = self.build(child, start)
        if high is None:
            loop = self.state()
            self.eps[start].append(loop)
            self.eps[self.build(child, loop)].append(loop)
            return loop
        end = self.state()
        self.eps[start].append(end)
        for _ in range(high - low):
            start = self.build(child, start)
            self.eps[start].append(end)
        return end


# --- byte DFA ---------------------------------------------------------------------------------------

@dataclass
class ByteDFA:
    transitions: np.ndarray  # [states, 256] int32, -1: no transition
    accepting: np.ndarray  # [states] bool
    initial: int = 0


def compile_regex(pattern: str) -> ByteDFA:
    """A minimal DFA over bytes accepting exactly the UTF-8 encodings of strings that fully match."""
    tree = _Parser(pattern).parse()
    nfa = _NFA()
    start = nfa.state()
    final = nfa.build(tree, start)
    # Byte equivalence classes: bytes no edge tells apart share one column of work.
    masks = {mask for edges in nfa.edges for mask, _ in edges}
    signature = {}
    for byte in range(256):
        key = tuple(bool(mask >> byte & 1) for mask in sorted(masks))
        signature.setdefault(key, []).append(byte)
    classes = list(signature.values())

    def closure(states):
        stack, seen = list(states), set(states)
        while stack:
            for nxt in nfa.eps[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return frozenset(seen)

    initial = closure([start])
    index, order, rows = {initial: 0}, [initial], []
    while len(rows) < len(order):
        current = order[len(rows)]
        row = np.full(256, -1, np.int32)
        for members in classes:
            byte = members[0]
            targets = [t for s in current for mask, t in nfa.edges[s] if mask >> byte & 1]
            if not targets:
                continue
            target = closure(targets)
            if target not in index:
                if len(order) > 20000:
                    raise ConstraintError(f"regex {pattern!r} needs more than 20000 DFA states; simplify it")
                index[target] = len(order)
                order.append(target)
            row[members] = index[target]
        rows.append(row)
    dfa = ByteDFA(np.stack(rows), np.array([final in s for s in order]))
    return minimize(prune(dfa))


def prune(dfa: ByteDFA) -> ByteDFA:
    """Drop states from which no accepting state is reachable (their transitions become -1)."""
    trans, alive = dfa.transitions, dfa.accepting.copy()
    while True:
        reaches = alive | np.any((trans >= 0) & alive[np.maximum(trans, 0)], axis=1)
        if (reaches == alive).all():
            break
        alive = reaches
    if not alive[dfa.initial]:
        return ByteDFA(np.full((1, 256), -1, np.int32), np.zeros(1, bool))
    keep = np.flatnonzero(alive)
    renumber = np.full(len(alive) + 1, -1, np.int32)
    renumber[keep] = np.arange(len(keep))
    trans = renumber[np.where(trans >= 0, trans, len(alive))][keep]
    return ByteDFA(trans, dfa.accepting[keep], int(renumber[dfa.initial]))


def minimize(dfa: ByteDFA) -> ByteDFA:
    """Moore's partition refinement (vectorized): states with the same future merge."""
    trans = dfa.transitions
    block = dfa.accepting.astype(np.int64)
    while True:
        successor = np.where(trans >= 0, block[np.maximum(trans, 0)], -1)
        _, new_block = np.unique(np.concatenate([block[:, None], successor], axis=1), axis=0, return_inverse=True)
        new_block = new_block.reshape(-1)
        if len(np.unique(new_block)) == len(np.unique(block)):
            break
        block = new_block
    count = int(block.max()) + 1
    representative = np.zeros(count, np.int64)
    representative[block] = np.arange(len(block))
    new_trans = np.where(trans[representative] >= 0, block[np.maximum(trans[representative], 0)], -1)
    # Renumber so that the initial state is 0.
    order = np.argsort(np.arange(count) != block[dfa.initial], kind="stable")
    rank = np.empty(count, np.int64)
    rank[order] = np.arange(count)
    new_trans = np.where(new_trans >= 0, rank[np.maximum(new_trans, 0)], -1)[order]
    return ByteDFA(new_trans.astype(np.int32), dfa.accepting[representative][order], 0)


# --- token automata ------------------------------------------------------------------------------

def token_bytes(tokenizer, padded_vocab: int) -> list[bytes | None]:
    """Each id's bytes; None for special tokens and ids past the tokenizer (never part of text)."""
    specials = set(tokenizer.special_tokens.values())
    out: list[bytes | None] = []
    for token in range(padded_vocab):
        if token >= tokenizer.vocab_size or token in specials:
            out.append(None)
        else:
            out.append(tokenizer.decode_bytes([token]))
    return out


def _byte_matrix(pieces: list[bytes | None]):
    lengths = np.array([-1 if p is None else len(p) for p in pieces])
    width = max(1, lengths.max())
    matrix = np.zeros((len(pieces), width), np.int32)
    for token, piece in enumerate(pieces):
        if piece:
            matrix[token, :len(piece)] = np.frombuffer(piece, np.uint8)
    return matrix, lengths


def lift_to_tokens(transitions: np.ndarray, pieces: list[bytes | None], *, hit=None):
    """next[state, token] after feeding the token's bytes through a byte DFA (-1: dead), and, when
    `hit` [states] is given, whether any state passed through (after the first byte) is a hit."""
    matrix, lengths = _byte_matrix(pieces)
    states = transitions.shape[0]
    current = np.broadcast_to(np.arange(states, dtype=np.int32)[:, None], (states, len(pieces))).copy()
    current[:, lengths <= 0] = -1  # special / empty tokens are not text
    any_hit = np.zeros(current.shape, bool) if hit is not None else None
    for j in range(matrix.shape[1]):
        active = (lengths > j)[None, :] & (current >= 0)
        stepped = transitions[np.maximum(current, 0), matrix[None, :, j]]
        current = np.where(active, stepped, current)
        if hit is not None:
            any_hit |= active & hit[np.maximum(current, 0)] & (current >= 0)
    return current, any_hit


def _distances(next_state: np.ndarray, accepting: np.ndarray) -> np.ndarray:
    """Fewest tokens from each state to an accepting one (breadth-first over the reversed graph)."""
    states = len(accepting)
    predecessors = [[] for _ in range(states)]
    for state in range(states):
        for target in np.unique(next_state[state]):
            if target >= 0:
                predecessors[target].append(state)
    distance = np.full(states, UNREACHABLE, np.int32)
    queue = deque(np.flatnonzero(accepting).tolist())
    distance[accepting] = 0
    while queue:
        state = queue.popleft()
        for previous in predecessors[state]:
            if distance[previous] == UNREACHABLE:
                distance[previous] = distance[state] + 1
                queue.append(previous)
    return distance


@dataclass
class TokenAutomaton:
    """A constraint over token ids: next[state, token] (-1: not allowed), accepting states, and the
    fewest tokens from each state to acceptance."""

    next: np.ndarray  # [states, padded_vocab] int32
    accepting: np.ndarray  # [states] bool
    distance: np.ndarray  # [states] int32
    initial: int = 0
    description: str = ""

    @property
    def min_tokens(self) -> int:
        return int(self.distance[self.initial])

    def accepts(self, tokens: list[int]) -> bool:
        state = self.initial
        for token in tokens:
            state = int(self.next[state, token])
            if state < 0:
                return False
        return bool(self.accepting[state])


def _automaton(next_state: np.ndarray, accepting: np.ndarray, description: str) -> TokenAutomaton:
    distance = _distances(next_state, accepting)
    automaton = TokenAutomaton(next_state.astype(np.int32), accepting.astype(bool), distance, 0, description)
    if automaton.min_tokens >= UNREACHABLE:
        raise ConstraintError(f"{description} is unsatisfiable: no output over this vocabulary matches it")
    return automaton


def regex_automaton(pattern: str, tokenizer, padded_vocab: int) -> TokenAutomaton:
    """Outputs that fully match `pattern` (see the module doc for the syntax)."""
    dfa = compile_regex(pattern)
    next_state, _ = lift_to_tokens(dfa.transitions, token_bytes(tokenizer, padded_vocab))
    return _automaton(next_state, dfa.accepting, f"regex {pattern!r}")


def json_schema_automaton(schema: dict | str, tokenizer, padded_vocab: int) -> TokenAutomaton:
    """Outputs that are compact JSON valid against `schema` (a dict or its JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ConstraintError(f"the JSON schema is not valid JSON: {error}") from error
    pattern = schema_to_regex(schema)
    dfa = compile_regex(pattern)
    next_state, _ = lift_to_tokens(dfa.transitions, token_bytes(tokenizer, padded_vocab))
    return _automaton(next_state, dfa.accepting, "JSON schema")


def forced_prefix_automaton(prefix: list[int], padded_vocab: int, allowed: list[int] | None = None,
                            vocab_size: int | None = None) -> TokenAutomaton:
    """Outputs that start with the token ids `prefix`, then use only `allowed` ids (default: any id
    below vocab_size)."""
    free = np.zeros(padded_vocab, bool)
    if allowed is None:
        free[: vocab_size or padded_vocab] = True
    else:
        if len(allowed) == 0:
            raise ConstraintError("the allowed token set is empty")
        free[np.asarray(allowed)] = True
    for token in prefix:
        if not 0 <= token < padded_vocab:
            raise ConstraintError(f"forced prefix token {token} is outside the vocabulary")
    states = len(prefix) + 1
    next_state = np.full((states, padded_vocab), -1, np.int32)
    for i, token in enumerate(prefix):
        next_state[i, token] = i + 1
    next_state[-1, free] = states - 1
    accepting = np.zeros(states, bool)
    accepting[-1] = True
    return _automaton(next_state, accepting, "forced prefix / allowed tokens")


def allowed_tokens_automaton(allowed: list[int], padded_vocab: int) -> TokenAutomaton:
    return forced_prefix_automaton([], padded_vocab, allowed)


def batch_automata(automata: list[TokenAutomaton], padded_vocab: int, max_new_tokens: int,
                   eos_id: int | None) -> dict:
    """One table for a batch: the distinct automata stacked, each row starting at its own initial state."""
    unique, offsets, initial = [], {}, []
    total = 0
    for automaton in automata:
        if automaton.next.shape[1] != padded_vocab:
            raise ConstraintError(f"constraint built for {automaton.next.shape[1]} token ids, the model has {padded_vocab}")
        if automaton.min_tokens > max_new_tokens:
            raise ConstraintError(f"{automaton.description} needs at least {automaton.min_tokens} tokens; "
                                  f"max_new_tokens={max_new_tokens} is too few")
        if id(automaton) not in offsets:
            offsets[id(automaton)] = total
            unique.append(automaton)
            total += len(automaton.accepting)
        initial.append(offsets[id(automaton)] + automaton.initial)
    next_state = np.concatenate([np.where(a.next >= 0, a.next + offsets[id(a)], -1) for a in unique])
    if eos_id is not None:
        next_state[:, eos_id] = -1  # EOS is granted by the loop in accepting states only
    return {
        "next": jnp.asarray(next_state, jnp.int32),
        "accepting": jnp.asarray(np.concatenate([a.accepting for a in unique])),
        "distance": jnp.asarray(np.concatenate([a.distance for a in unique]), jnp.int32),
        "initial": jnp.asarray(np.array(initial, np.int32)),
    }


# --- stop strings ---------------------------------------------------------------------------------

@dataclass
class StopAutomaton:
    next: np.ndarray  # [states, padded_vocab] int32
    hit: np.ndarray  # [states, padded_vocab] bool: a stop string completes inside this token

    def arrays(self) -> dict:
        return {"next": jnp.asarray(self.next), "hit": jnp.asarray(self.hit)}


def stop_string_automaton(stop_strings: list[str], tokenizer, padded_vocab: int) -> StopAutomaton:
    """Aho-Corasick over the bytes of the stop strings, lifted to tokens."""
    patterns = [s.encode("utf-8") for s in stop_strings]
    if not patterns or any(len(p) == 0 for p in patterns):
        raise ConstraintError("stop strings must be non-empty")
    goto, output = [dict()], [False]
    for pattern in patterns:
        state = 0
        for byte in pattern:
            if byte not in goto[state]:
                goto.append({})
                output.append(False)
                goto[state][byte] = len(goto) - 1
            state = goto[state][byte]
        output[state] = True
    transitions = np.zeros((len(goto), 256), np.int32)
    fail = [0] * len(goto)
    queue = deque()
    for byte in range(256):
        target = goto[0].get(byte, 0)
        transitions[0, byte] = target
        if target:
            queue.append(target)
    while queue:
        state = queue.popleft()
        output[state] = output[state] or output[fail[state]]
        for byte in range(256):
            if byte in goto[state]:
                target = goto[state][byte]
                fail[target] = transitions[fail[state], byte]
                transitions[state, byte] = target
                queue.append(target)
            else:
                transitions[state, byte] = transitions[fail[state], byte]
    pieces = token_bytes(tokenizer, padded_vocab)
    next_state, hit = lift_to_tokens(transitions, pieces, hit=np.array(output))
    next_state = np.where(next_state >= 0, next_state, np.arange(len(goto))[:, None])  # specials: no change
    return StopAutomaton(next_state.astype(np.int32), hit)


# --- JSON schema -> regex -------------------------------------------------------------------------

JSON_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
JSON_INTEGER = r"-?(?:0|[1-9][0-9]*)"
JSON_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
SUPPORTED = {"type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf", "minLength", "maxLength",
             "minItems", "maxItems", "additionalProperties", "title", "description", "$schema", "default",
             "examples", "minimum", "maximum"}


def _escape(text: str) -> str:
    return "".join("\\" + c if c in r".^$*+?{}[]\|()-" else c for c in text)


def schema_to_regex(schema) -> str:
    """A regex for compact JSON documents valid against `schema` (the subset in the module doc)."""
    if schema is True or schema == {}:
        raise ConstraintError("a schema that allows any JSON value is not supported; give a type")
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema must be an object, got {schema!r}")
    unknown = set(schema) - SUPPORTED
    if unknown:
        raise ConstraintError(f"JSON schema keywords not supported: {', '.join(sorted(unknown))}")
    if "const" in schema:
        return _escape(json.dumps(schema["const"], separators=(",", ":")))
    if "enum" in schema:
        if not schema["enum"]:
            return "[^\\s\\S]"  # matches nothing: reported as unsatisfiable
        return "(?:" + "|".join(_escape(json.dumps(v, separators=(",", ":"))) for v in schema["enum"]) + ")"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return "(?:" + "|".join(schema_to_regex(s) for s in schema[key]) + ")"
    kind = schema.get("type")
    if isinstance(kind, list):
        return "(?:" + "|".join(schema_to_regex({**schema, "type": k}) for k in kind) + ")"
    if kind == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        return '"' + JSON_CHAR + "{" + f"{low}," + ("" if high is None else str(high)) + "}" + '"'
    if kind == "integer":
        return JSON_INTEGER[2:] if schema.get("minimum", -1) >= 0 else JSON_INTEGER
    if kind == "number":
        return JSON_NUMBER
    if kind == "boolean":
        return "(?:true|false)"
    if kind == "null":
        return "null"
    if kind == "array":
        item = schema_to_regex(schema.get("items", {"type": "string"}))
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if high is not None and high < low:
            return "[^\\s\\S]"
        if high == 0:
            return r"\[\]"
        rest = "{" + f"{max(low - 1, 0)}," + ("" if high is None else str(high - 1)) + "}"
        items = f"{item}(?:,{item}){rest}"
        return r"\[" + (items if low > 0 else f"(?:{items})?") + r"\]"
    if kind == "object":
        properties = schema.get("properties", {})
        missing = set(schema.get("required", [])) - set(properties)
        if missing:
            raise ConstraintError(f"required properties without a schema: {', '.join(sorted(missing))}")
        fields = [_escape(json.dumps(name)) + ":" + schema_to_regex(sub) for name, sub in properties.items()]
        return r"\{" + ",".join(fields) + r"\}"
    raise ConstraintError(f"JSON schema type {kind!r} is not supported (or missing)")
