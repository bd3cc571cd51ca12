"""Byte-level BPE (GPT-2 style): encode, decode, and the GPT-2 / Hugging Face file formats.

    tokenizer = BPETokenizer.from_gpt2_files("vocab.json", "merges.txt")   # OpenAI / HF layout
    tokenizer = BPETokenizer.from_hf_tokenizer_json("tokenizer.json")       # HF `tokenizers`
    tokenizer = llmjax.tokenizer.gguf.tokenizer_from_gguf("model.gguf")       # llama.cpp
    ids = tokenizer.encode("Hello world<|endoftext|>")                      # [15496, 995, 50256]
    tokenizer.save("bpe.json")                                             # our JSON: from_json reads it
    tokenizer.save_gpt2_files("out/")                                       # vocab.json + merges.txt

Encoding splits text at special tokens, then into pre-tokens with the regex `pattern`, then
merges each pre-token's bytes: repeatedly the adjacent pair of lowest merge rank, leftmost
first (the rule of Hugging Face `tokenizers` and tiktoken). Pre-token -> ids results are kept in
a bounded per-instance cache: natural text repeats its pre-tokens, so most are looked up, not
merged.

Token ids can be assigned in any order (GPT-2's byte tokens are not ids 0..255); the merge
table works on ids directly: (id_a, id_b) -> (rank, id_merged), packed into one int each.

Real vocabularies may lack single-byte tokens for bytes that never occur in UTF-8 text (0xc0, 0xc1,
0xf5-0xff, ...): they load, and only a text that needs such a byte is refused (TokenizerError naming it).
A model file's roles (BOS, EOS, unknown, padding ids) and whether prompts start with BOS travel with the
tokenizer as `special_ids`; `encode_prompt` applies them.
"""

from __future__ import annotations

import base64
import dataclasses
import heapq
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from llmjax.tokenizer.base import ENDOFTEXT, SpecialIds, Tokenizer, TokenizerError
from llmjax.tokenizer.pretokenize import (
    DIGITS_THEN_GPT2_PATTERN,
    GPT2_PATTERN,
    compile_pattern,
    find_last_safe_cut,
    replace_lone_surrogates,
    special_token_splitter,
)

DEFAULT_CACHE_SIZE = 1 << 15  # pre-tokens whose ids are remembered (about 200 bytes each)
_LONG_PIECE = 48  # pre-tokens at least this long merge with a heap: O(n log n), not O(n^2)
_STREAM_BLOCK = 1 << 16  # encode_iterable encodes text in blocks of about this many characters
_NO_MERGE = 1 << 62  # larger than any packed (rank, id)
FORMAT_VERSION = 1


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in vocab.json / merges.txt.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) map to
    U+0100 onwards, in byte order, so b" " is "Ġ" and b"\\n" is "Ċ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in mapping)
    mapping.update((b, chr(256 + n)) for n, b in enumerate(extra))
    return dict(sorted(mapping.items()))


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {char: byte for byte, char in BYTE_TO_UNICODE.items()}


class BPETokenizer(Tokenizer):
    """Byte-level BPE: `vocab` {id: bytes}, `merges` [(bytes, bytes)] in rank order, a pre-tokenizer
    regex and special tokens {text: id}.

    Single-byte tokens may be missing (as in real vocabularies for bytes UTF-8 never uses): a text that
    needs one is refused when encoded. Special tokens may be in `vocab` or not; they are never produced by
    merges and match in text only when allowed.
    ignore_merges: a pre-token that is itself a token is emitted whole (Hugging Face's option).
    special_ids: the BOS / EOS / unknown / padding ids and the add-BOS / add-EOS rule (see `encode_prompt`).
    """

    kind = "byte_bpe"

    def __init__(
        self,
        vocab: Mapping[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        pattern: str = GPT2_PATTERN,
        special_tokens: Mapping[str, int] | None = None,
        *,
        ignore_merges: bool = False,
        special_ids: SpecialIds | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        specials = dict(special_tokens or {})
        special_token_splitter(tuple(specials))  # rejects "" early
        self._pattern = pattern
        self._findall = compile_pattern(pattern).findall
        self._special_tokens = specials
        self._ignore_merges = bool(ignore_merges)
        self._cache_size = max(int(cache_size), 0)
        self._cache: dict[str, tuple[int, ...]] = {}

        special_id_set = set(specials.values())
        decoder = {_check_id(i): _check_bytes(i, t) for i, t in vocab.items()}  # id -> bytes
        decoder.update((_check_id(i), token.encode("utf-8")) for token, i in specials.items())
        self._decoder = decoder
        self._vocab_size = max(decoder) + 1 if decoder else 0
        self._token_ids = _regular_token_ids(decoder, special_id_set)  # bytes -> id, specials excluded
        self._byte_ids = _byte_ids(self._token_ids)  # [byte value] -> id, None where the vocabulary lacks it
        self._missing_bytes = frozenset(byte for byte, i in enumerate(self._byte_ids) if i is None)
        self._identity_bytes = self._byte_ids == list(range(256))
        self._special_ids = (special_ids or SpecialIds()).check(self._vocab_size)
        self._merges = [(bytes(x), bytes(y)) for x, y in merges]
        self._shift = max(self._vocab_size, 2).bit_length()  # pair (a, b) is the int a << shift | b
        self._mask = (1 << self._shift) - 1
        self._merge_table = self._build_merge_table()  # pair -> rank << shift | merged id

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self._vocab_size}, merges={len(self._merges)}, "
                f"special_tokens={self._special_tokens}, pattern={self._pattern[:24]!r}...)")

    def __getstate__(self) -> dict:
        """Pickled for worker processes without the cache and the compiled regex."""
        state = dict(self.__dict__)
        state["_cache"] = {}
        del state["_findall"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._findall = compile_pattern(self._pattern).findall

    # --- construction -------------------------------------------------------------------------

    def _build_merge_table(self) -> dict[int, int]:
        table = {}
        ids = self._token_ids
        for rank, (x, y) in enumerate(self._merges):
            for part in (x, y, x + y):
                if part not in ids:
                    raise TokenizerError(
                        f"merge {rank} ({x!r}, {y!r}) needs the token {part!r}, which is not in the vocabulary"
                    )
            table[ids[x] << self._shift | ids[y]] = rank << self._shift | ids[x + y]  # a repeated pair: last wins, as in HF
        return table

    @classmethod
    def from_merge_ids(
        cls,
        merges: Sequence[tuple[int, int]],
        pattern: str = GPT2_PATTERN,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        **options,
    ) -> BPETokenizer:
        """The canonical layout: ids 0..255 bytes, merge r -> id 256 + r (given as an id pair), then specials."""
        tokens = [bytes([i]) for i in range(256)]
        merged = []
        for a, b in merges:
            if not (0 <= a < len(tokens) and 0 <= b < len(tokens)):
                raise TokenizerError(f"merge {len(merged)} ({a}, {b}) refers to an id not created before it")
            merged.append((tokens[a], tokens[b]))
            tokens.append(tokens[a] + tokens[b])
        specials = {token: len(tokens) + i for i, token in enumerate(special_tokens)}
        return cls(dict(enumerate(tokens)), merged, pattern, specials, **options)

    # --- the Tokenizer interface ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def special_ids(self) -> SpecialIds:
        """BOS / EOS / unknown / padding ids and whether prompts get BOS / EOS added (as the model file says)."""
        return self._special_ids

    @property
    def vocab(self) -> dict[int, bytes]:
        """{id: bytes} for every id, special tokens included (as their UTF-8)."""
        return dict(self._decoder)

    @property
    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merges in rank order."""
        return list(self._merges)

    @property
    def pattern(self) -> str:
        return self._pattern

    @property
    def ignore_merges(self) -> bool:
        return self._ignore_merges

    @property
    def missing_bytes(self) -> frozenset[int]:
        """Byte values with no single-byte token: a text whose UTF-8 has one of them cannot be encoded."""
        return self._missing_bytes

    def encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cached = self._cache.get
        for piece in self._findall(text):
            piece_ids = cached(piece)
            if piece_ids is None:
                piece_ids = self._encode_and_cache(piece)
            ids += piece_ids
        return ids

    def _encode_and_cache(self, piece: str) -> tuple[int, ...]:
        piece_ids = self._encode_piece(piece)
        cache = self._cache
        if len(cache) >= self._cache_size:  # drop the oldest half: amortized O(1), keeps recent pieces
            for old in list(itertools.islice(cache, len(cache) // 2 + 1)):
                del cache[old]
        if self._cache_size:
            cache[piece] = piece_ids
        return piece_ids

    def encode(self, text: str, *, allowed_special: str | set[str] = "all") -> list[int]:
        """As `Tokenizer.encode` (same result), with the special-token regex compiled once."""
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        splitter = special_token_splitter(tuple(sorted(allowed)))
        ids: list[int] = []
        position = 0
        for match in splitter.finditer(text):
            if match.start() > position:
                ids += self.encode_ordinary(text[position : match.start()])
            ids.append(self._special_tokens[match.group()])
            position = match.end()
        if position < len(text):
            ids += self.encode_ordinary(text[position:] if position else text)
        return ids

    def encode_iterable(self, chunks: Iterable[str], *, allowed_special: str | set[str] = "all") -> Iterator[int]:
        """Ids for a stream of text chunks, equal to encoding their concatenation, in bounded memory.

        Chunks are gathered into blocks of about 64 Ki characters, and each block is encoded up
        to its last exact cut (a space after a non-space, outside any special token; see
        `pretokenize.find_safe_cut`); the rest is carried into the next block. Text with no such
        space for 64 blocks in a row is encoded as it is (the only place ids can differ).
        """
        allowed = self._allowed(allowed_special)
        margin = max(map(len, allowed), default=0)
        pending: list[str] = []
        size, next_try = 0, _STREAM_BLOCK
        for chunk in chunks:
            pending.append(chunk)
            size += len(chunk)
            if size < next_try:
                continue
            text = "".join(pending)
            cut = find_last_safe_cut(text, len(text) - margin, allowed)
            if cut is None and size < 64 * _STREAM_BLOCK:
                pending, next_try = [text], 2 * size  # no cut yet: look again when twice as long
                continue
            cut = cut or len(text)
            yield from self.encode(text[:cut], allowed_special=allowed)
            pending = [text[cut:]]
            size, next_try = len(pending[0]), _STREAM_BLOCK
        if size:
            yield from self.encode("".join(pending), allowed_special=allowed)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except KeyError as error:
            raise TokenizerError(f"token id {error.args[0]!r} is not in this vocabulary of {self._vocab_size} ids") from None
        except TypeError as error:
            raise TokenizerError(f"token ids must be ints ({error})") from None

    # --- BPE on one pre-token -------------------------------------------------------------------

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-token: its bytes merged by lowest rank, leftmost first."""
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError:
            data = replace_lone_surrogates(piece).encode("utf-8")
        if self._ignore_merges and data in self._token_ids:
            return (self._token_ids[data],)
        if self._missing_bytes and not self._missing_bytes.isdisjoint(data):
            raise self._missing_byte_error(piece, data)
        parts = list(data) if self._identity_bytes else [self._byte_ids[byte] for byte in data]  # [symbol id]
        if len(parts) < 2:
            return tuple(parts)
        if len(parts) >= _LONG_PIECE:
            return tuple(self._merge_long(parts))
        return tuple(self._merge_short(parts))

    def _missing_byte_error(self, piece: str, data: bytes) -> TokenizerError:
        byte = next(b for b in data if b in self._missing_bytes)
        return TokenizerError(
            f"cannot encode {piece!r}: it needs the byte 0x{byte:02x}, which has no token in this vocabulary "
            f"(it lacks {len(self._missing_bytes)} of the 256 single-byte tokens: {_byte_list(self._missing_bytes)})"
        )

    def _merge_short(self, parts: list[int]) -> list[int]:
        """Merge in place: rescan for the lowest (rank, id) pair; O(n^2), fastest for short pieces."""
        get = self._merge_table.get
        shift, mask = self._shift, self._mask
        ranks = [get(a << shift | b, _NO_MERGE) for a, b in zip(parts, parts[1:])]  # [pair i] -> packed
        while ranks:
            best = min(ranks)
            if best == _NO_MERGE:
                break
            i = ranks.index(best)  # leftmost among equals
            merged = best & mask
            parts[i : i + 2] = (merged,)
            del ranks[i]
            if i < len(ranks):
                ranks[i] = get(merged << shift | parts[i + 1], _NO_MERGE)
            if i > 0:
                ranks[i - 1] = get(parts[i - 1] << shift | merged, _NO_MERGE)
        return parts

    def _merge_long(self, parts: list[int]) -> list[int]:
        """The same merges with a heap of (packed rank, position) over a linked list: O(n log n)."""
        get = self._merge_table.get
        shift, mask = self._shift, self._mask
        n = len(parts)
        symbols: list[int | None] = list(parts)  # None once merged into its left neighbour
        following = list(range(1, n + 1))  # [position] -> next live position (n: none)
        preceding = list(range(-1, n - 1))  # [position] -> previous live position (-1: none)
        heap = [(rank, i) for i, rank in enumerate(get(a << shift | b) for a, b in zip(parts, parts[1:])) if rank is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = following[i]
            if symbols[i] is None or j >= n or get(symbols[i] << shift | symbols[j]) != rank:
                continue  # stale: one side was merged since this pair was pushed
            merged = rank & mask
            symbols[i], symbols[j] = merged, None
            following[i] = following[j]
            if following[j] < n:
                preceding[following[j]] = i
            for left, right in ((preceding[i], i), (i, following[i])):
                if left >= 0 and right < n:
                    pair_rank = get(symbols[left] << shift | symbols[right])
                    if pair_rank is not None:
                        heapq.heappush(heap, (pair_rank, left))
        return [s for s in symbols if s is not None]

    # --- our JSON format ------------------------------------------------------------------------

    def to_json(self) -> dict:
        """{"type": "byte_bpe", "pattern", "special_tokens", "byte_ids": [id of byte 0..255],
        "merges": [[id_a, id_b], ...] in rank order, "merge_ids": first id if merge r creates
        first + r else [id per merge], "extra_tokens": {id: base64 bytes} for tokens that are
        neither bytes nor merge results, "ignore_merges", and "special_ids" when any is set}: exact
        and compact. A byte the vocabulary lacks has byte_ids null."""
        ids = self._token_ids
        merge_pairs = [[ids[x], ids[y]] for x, y in self._merges]
        merge_ids = [ids[x + y] for x, y in self._merges]
        first = merge_ids[0] if merge_ids else 256
        contiguous = merge_ids == list(range(first, first + len(merge_ids)))
        special_ids = set(self._special_tokens.values())
        made = set(self._byte_ids) | set(merge_ids) | special_ids
        extra = {str(i): base64.b64encode(t).decode("ascii") for i, t in sorted(self._decoder.items()) if i not in made}
        roles = {} if self._special_ids == SpecialIds() else {"special_ids": dataclasses.asdict(self._special_ids)}
        return {
            "type": self.kind,
            "version": FORMAT_VERSION,
            "pattern": self._pattern,
            "special_tokens": dict(self._special_tokens),
            "byte_ids": list(self._byte_ids),
            "merges": merge_pairs,
            "merge_ids": first if contiguous else merge_ids,
            "extra_tokens": extra,
            "ignore_merges": self._ignore_merges,
            **roles,
        }

    @classmethod
    def from_json(cls, data: dict) -> BPETokenizer:
        if not isinstance(data, dict) or data.get("type") != cls.kind:
            found = data.get("type") if isinstance(data, dict) else type(data).__name__
            raise TokenizerError(f"not a {cls.kind} tokenizer JSON (type is {found!r})")
        if data.get("version", FORMAT_VERSION) > FORMAT_VERSION:
            raise TokenizerError(f"{cls.kind} JSON version {data['version']} is newer than this llmjax reads ({FORMAT_VERSION})")
        try:
            byte_ids = [None if i is None else int(i) for i in data["byte_ids"]]
            if len(byte_ids) != 256:
                raise TokenizerError(f"byte_ids has {len(byte_ids)} entries, not 256")
            pairs = [(int(a), int(b)) for a, b in data["merges"]]
            merge_ids = data["merge_ids"]
            if isinstance(merge_ids, int):  # contiguous from this id
                merge_ids = list(range(merge_ids, merge_ids + len(pairs)))
            merge_ids = [int(i) for i in merge_ids]
            if len(merge_ids) != len(pairs):
                raise TokenizerError(f"merge_ids has {len(merge_ids)} entries for {len(pairs)} merges")
            vocab = {i: bytes([byte]) for byte, i in enumerate(byte_ids) if i is not None}
            vocab.update((int(i), base64.b64decode(t, validate=True)) for i, t in data.get("extra_tokens", {}).items())
            merges = _resolve_merges(pairs, merge_ids, vocab)
            specials = {str(token): int(i) for token, i in data["special_tokens"].items()}
            roles = SpecialIds(**data.get("special_ids", {}))
            return cls(vocab, merges, data["pattern"], specials, ignore_merges=bool(data.get("ignore_merges", False)),
                       special_ids=roles)
        except TokenizerError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise TokenizerError(f"malformed {cls.kind} JSON: {type(error).__name__}: {error}") from None

    # --- GPT-2 files: vocab.json + merges.txt -----------------------------------------------------

    @classmethod
    def from_gpt2_files(
        cls,
        vocab_json: str | os.PathLike,
        merges_txt: str | os.PathLike,
        special_tokens: Sequence[str] | Mapping[str, int] = (ENDOFTEXT,),
        pattern: str = GPT2_PATTERN,
    ) -> BPETokenizer:
        """Load GPT-2's encoder.json/vocab.json ({token in GPT-2's byte alphabet: id}) and
        vocab.bpe/merges.txt (one "a b" merge per line, rank order, optional "#version" line).

        special_tokens: names (their id is read from vocab.json, or appended after the largest
        id when absent) or {name: id}. The files do not store the regex: give `pattern`.
        """
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        vocab = _read_json(vocab_json)
        if not isinstance(vocab, dict):
            raise TokenizerError(f"{vocab_json}: expected a JSON object {{token: id}}, got {type(vocab).__name__}")
        merges = _parse_merges_txt(merges_txt.read_text(encoding="utf-8"), merges_txt)
        specials = _special_ids(special_tokens, vocab)
        return cls.from_byte_level_vocab(vocab, merges, specials, pattern, False, vocab_json.name)

    def save_gpt2_files(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        """Write vocab.json and merges.txt (GPT-2 / Hugging Face layout) into `folder`.

        Special tokens are written into vocab.json under their own text, as GPT-2 does with
        "<|endoftext|>"; name them again when loading (`from_gpt2_files(special_tokens=...)`).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        special_ids = set(self._special_tokens.values())
        vocab = {_to_unicode(t): i for i, t in sorted(self._decoder.items()) if i not in special_ids}
        for token, i in sorted(self._special_tokens.items(), key=lambda item: item[1]):
            if vocab.get(token, i) != i:
                raise TokenizerError(f"special token {token!r} spells the same as token {vocab[token]} in vocab.json")
            vocab[token] = i
        lines = ["#version: 0.2"] + [f"{_to_unicode(x)} {_to_unicode(y)}" for x, y in self._merges]
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        _write_atomic(vocab_path, json.dumps(vocab, ensure_ascii=False))
        _write_atomic(merges_path, "\n".join(lines) + "\n")
        return vocab_path, merges_path

    # --- Hugging Face tokenizer.json ------------------------------------------------------------

    @classmethod
    def from_hf_tokenizer_json(cls, path: str | os.PathLike) -> BPETokenizer:
        """Load a byte-level BPE saved by Hugging Face `tokenizers` (GPT-2, RoBERTa, Llama 3, SmolLM, ...): the
        ids `tokenizers` gives.

        added_tokens become special tokens; a TemplateProcessing post-processor that puts a special token
        first / last becomes `special_ids` add_bos / add_eos. Pre-tokenizers: ByteLevel (GPT-2's regex),
        Split(regex) then ByteLevel(use_regex=false) (Llama 3), Digits(individual_digits) then ByteLevel
        (SmolLM, StarCoder). Accepted as the no-ops they are here: an empty normalizer Sequence, byte_fallback
        (every byte has a byte-level symbol), a vocabulary without some single-byte tokens (a text that needs
        one is refused when encoded, where `tokenizers` would give the unknown token). Rejected with a
        message: other models (WordPiece, Unigram), normalizers that change text, other pre-tokenizers, and
        options this class does not implement (add_prefix_space, dropout, lstrip / rstrip added tokens, ...).
        """
        path = Path(path)
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json (no 'model' object)")
        model = data["model"]
        model_type = model.get("type", "BPE" if "merges" in model else None)
        if model_type != "BPE":
            raise TokenizerError(f"{path}: model type is {model_type!r}; only byte-level BPE loads as a BPETokenizer")
        _check_hf_normalizer(data.get("normalizer"), path)
        pattern = _hf_byte_level_pattern(data.get("pre_tokenizer"), path)
        for option, harmless in (("dropout", (None, 0, 0.0)), ("continuing_subword_prefix", (None, "")),
                                 ("end_of_word_suffix", (None, ""))):
            if model.get(option) not in harmless:
                raise TokenizerError(f"{path}: model option {option}={model[option]!r} is not supported")
        try:
            specials = _hf_added_tokens(data.get("added_tokens") or [], path)
            merges = [_hf_merge(m, path, rank) for rank, m in enumerate(model.get("merges") or [])]
            vocab = dict(model.get("vocab") or {})
            roles = _hf_special_ids(data.get("post_processor"))
        except TokenizerError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            raise TokenizerError(f"{path}: malformed tokenizer.json ({type(error).__name__}: {error})") from None
        return cls.from_byte_level_vocab(vocab, merges, specials, pattern, bool(model.get("ignore_merges")), path.name,
                                       special_ids=roles)

    @classmethod
    def from_byte_level_vocab(cls, vocab: dict, merges: list[tuple[str, str, str]], specials: dict[str, int],
                            pattern: str, ignore_merges: bool, vocab_name: str,
                            special_ids: SpecialIds | None = None) -> BPETokenizer:
        """Build from a {token in GPT-2's byte alphabet: id} vocab (special tokens in their own spelling) and
        (where, a, b) merges, `where` naming the merge's place in its file for messages ("merges.txt line 6")."""
        special_id_set = set(specials.values())
        decoded = {}
        for token, i in vocab.items():
            if not isinstance(i, int) or i < 0:
                raise TokenizerError(f"{vocab_name}: token {token!r} has id {i!r}, not a non-negative int")
            if i in special_id_set:
                continue
            if any(char not in UNICODE_TO_BYTE for char in token):
                raise TokenizerError(
                    f"{vocab_name}: token {token!r} (id {i}) has characters outside GPT-2's byte alphabet; "
                    "not a byte-level vocabulary (or name it as a special token)"
                )
            decoded[i] = bytes(UNICODE_TO_BYTE[char] for char in token)
        merge_bytes = []
        for where, x, y in merges:
            for part in (x, y, x + y):
                what = "merges into" if part == x + y else "refers to"
                if part not in vocab:
                    raise TokenizerError(f"{where}: '{x} {y}' {what} token {part!r}, which is not in {vocab_name}")
                if vocab[part] in special_id_set:
                    raise TokenizerError(f"{where}: '{x} {y}' {what} the special token {part!r}")
            merge_bytes.append((decoded[vocab[x]], decoded[vocab[y]]))
        return cls(decoded, merge_bytes, pattern, specials, ignore_merges=ignore_merges, special_ids=special_ids)


# --- helpers ----------------------------------------------------------------------------------


def _check_id(i) -> int:
    if not isinstance(i, int) or isinstance(i, bool) or i < 0:
        raise TokenizerError(f"token ids must be non-negative ints, got {i!r}")
    return i


def _check_bytes(i: int, token) -> bytes:
    if not isinstance(token, (bytes, bytearray)) or not token:
        raise TokenizerError(f"token {i} must be non-empty bytes, got {token!r}")
    return bytes(token)


def _regular_token_ids(decoder: dict[int, bytes], special_ids: set[int]) -> dict[bytes, int]:
    """bytes -> id over the non-special tokens; two ids with the same bytes is an error."""
    ids: dict[bytes, int] = {}
    for i, token in sorted(decoder.items()):
        if i in special_ids:
            continue
        if token in ids:
            raise TokenizerError(f"ids {ids[token]} and {i} both stand for {token!r}; a vocabulary maps bytes to one id")
        ids[token] = i
    return ids


def _byte_ids(token_ids: dict[bytes, int]) -> list[int | None]:
    """[byte value] -> the id of its single-byte token, None where the vocabulary has none."""
    return [token_ids.get(bytes([b])) for b in range(256)]


def _byte_list(values: Iterable[int], shown: int = 8) -> str:
    """"0x04, 0x06, ..." for the first `shown` of some byte values."""
    ordered = sorted(values)
    return ", ".join(f"0x{b:02x}" for b in ordered[:shown]) + (", ..." if len(ordered) > shown else "")


def _resolve_merges(pairs: list[tuple[int, int]], merge_ids: list[int], vocab: dict[int, bytes]) -> list[tuple[bytes, bytes]]:
    """Merges as byte pairs from id pairs; adds each merge result to `vocab`. Merges may refer to
    ids made by later merges (resolved over several passes)."""
    resolved: list[tuple[bytes, bytes] | None] = [None] * len(pairs)
    pending = list(range(len(pairs)))
    while pending:
        still = []
        for r in pending:
            a, b = pairs[r]
            if a in vocab and b in vocab:
                resolved[r] = (vocab[a], vocab[b])
                vocab.setdefault(merge_ids[r], vocab[a] + vocab[b])
            else:
                still.append(r)
        if len(still) == len(pending):
            r = still[0]
            raise TokenizerError(f"merge {r} {list(pairs[r])} refers to an id that no byte, merge or extra token defines")
        pending = still
    return resolved


def _special_ids(special_tokens: Sequence[str] | Mapping[str, int], vocab: dict[str, int]) -> dict[str, int]:
    if isinstance(special_tokens, Mapping):
        return {str(token): _check_id(i) for token, i in special_tokens.items()}
    if isinstance(special_tokens, str):
        raise TokenizerError(f"special_tokens must be a list of strings, not the string {special_tokens!r}")
    next_id = max(vocab.values(), default=-1) + 1
    ids = {}
    for token in special_tokens:
        if token in vocab:
            ids[token] = vocab[token]
        else:
            ids[token], next_id = next_id, next_id + 1
    return ids


def _parse_merges_txt(text: str, path: Path) -> list[tuple[str, str, str]]:
    """("merges.txt line N", a, b) per merge line; '#version' header and blank lines skipped."""
    merges = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{path.name} line {number}: expected two tokens separated by one space, got {line!r}")
        merges.append((f"{path.name} line {number}", parts[0], parts[1]))
    return merges


def _hf_merge(merge, path: Path, rank: int) -> tuple[str, str, str]:
    """("tokenizer.json model.merges[r]", a, b) from "a b" (older tokenizers) or ["a", "b"] (tokenizers >= 0.20)."""
    parts = merge.split(" ") if isinstance(merge, str) else merge
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise TokenizerError(f"{path}: model.merges[{rank}] is {merge!r}, not two tokens")
    return f"{path.name} model.merges[{rank}]", parts[0], parts[1]


def _hf_added_tokens(added_tokens: list, path: Path) -> dict[str, int]:
    """{content: id} of the added tokens (all matched in text as one id); options that strip spaces are refused."""
    specials = {}
    for added in added_tokens:
        for option in ("lstrip", "rstrip", "single_word"):
            if added.get(option):
                raise TokenizerError(
                    f"{path}: added token {added['content']!r} has {option}=true, which is not supported"
                )
        specials[str(added["content"])] = int(added["id"])
    return specials


def _check_hf_normalizer(normalizer, path: Path) -> None:
    """Refuse a normalizer that changes text (byte-level BPE here takes text as is); None and a Sequence of no
    normalizers (what transformers writes for GGUF tokenizers) leave it as is."""
    if not _is_noop_normalizer(normalizer):
        found = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        raise TokenizerError(f"{path}: has a normalizer ({found!r}); byte-level BPE here takes text as is")


def _is_noop_normalizer(normalizer) -> bool:
    if normalizer is None:
        return True
    is_sequence = isinstance(normalizer, dict) and normalizer.get("type") == "Sequence"
    return is_sequence and all(map(_is_noop_normalizer, normalizer.get("normalizers") or []))


def _hf_special_ids(post_processor) -> SpecialIds:
    """BOS / EOS added to every text by a TemplateProcessing post-processor (alone or in a Sequence) whose
    single-text template starts / ends with a special token (Llama 3: "<|begin_of_text|> $A"); else none."""
    is_sequence = isinstance(post_processor, dict) and post_processor.get("type") == "Sequence"
    for processor in post_processor.get("processors", []) if is_sequence else [post_processor]:
        is_template = isinstance(processor, dict) and processor.get("type") == "TemplateProcessing"
        if not is_template or not processor.get("single"):
            continue
        ids = {name: entry["ids"] for name, entry in (processor.get("special_tokens") or {}).items()}
        first, last = processor["single"][0], processor["single"][-1]
        bos = ids[first["SpecialToken"]["id"]][0] if "SpecialToken" in first else None
        eos = ids[last["SpecialToken"]["id"]][-1] if "SpecialToken" in last else None
        return SpecialIds(bos=bos, eos=eos, add_bos=bos is not None, add_eos=eos is not None)
    return SpecialIds()


def _hf_byte_level_pattern(pre_tokenizer, path: Path) -> str:
    """The regex of a byte-level pre-tokenizer: ByteLevel(use_regex=True) is GPT-2's; a Sequence
    [Digits(individual_digits=True), ByteLevel(use_regex=True)] (SmolLM, StarCoder) GPT-2's after every digit
    is cut off alone; a Sequence [Split(regex, Isolated), ByteLevel(use_regex=False)] (Llama 3 style) its own."""
    is_sequence = isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "Sequence"
    steps = pre_tokenizer.get("pretokenizers", []) if is_sequence else [pre_tokenizer]
    if not steps or not isinstance(steps[-1], dict) or steps[-1].get("type") != "ByteLevel":
        found = pre_tokenizer.get("type") if isinstance(pre_tokenizer, dict) else pre_tokenizer
        raise TokenizerError(f"{path}: pre_tokenizer is {found!r}, not byte-level; only byte-level BPE loads as a BPETokenizer")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        raise TokenizerError(f"{path}: ByteLevel add_prefix_space=true is not supported (it prepends a space to each text)")
    splits = steps[:-1]
    if byte_level.get("use_regex", True):
        if not splits:
            return GPT2_PATTERN
        if len(splits) == 1 and splits[0] == {"type": "Digits", "individual_digits": True}:
            return DIGITS_THEN_GPT2_PATTERN
        found = [step.get("type") if isinstance(step, dict) else step for step in splits]
        raise TokenizerError(f"{path}: {found} before ByteLevel(use_regex=true) is not supported "
                             "(only Digits(individual_digits=true) is)")
    if len(splits) != 1 or splits[0].get("type") != "Split":
        raise TokenizerError(f"{path}: ByteLevel(use_regex=false) needs exactly one Split pre-tokenizer before it")
    split = splits[0]
    pattern = split.get("pattern", {})
    if "Regex" not in pattern or split.get("behavior") != "Isolated" or split.get("invert"):
        raise TokenizerError(f"{path}: only Split(Regex, behavior=Isolated, invert=false) is supported, got {split!r}")
    return pattern["Regex"]


def _to_unicode(token: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"no such file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path}: not valid JSON ({error})") from None


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
