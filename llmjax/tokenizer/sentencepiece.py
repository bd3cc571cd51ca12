"""SentencePiece models (BPE or unigram) behind our `Tokenizer` interface, and training them.

A `SentencePieceTokenizer` wraps a `sentencepiece.SentencePieceProcessor`: models we train here and
existing `.model` files (LLaMA, T5...) alike. Its JSON holds the serialized model proto (base64),
so `save`, `from_json` and `fingerprint` work as for every other tokenizer, and `save_model`
writes a plain `.model` file back for other SentencePiece tools. A model read from a model file
(llmjax.tokenizer.gguf: LLaMA's GGUF files) also keeps that file's BOS / EOS rule as `special_ids`,
which `encode_prompt` applies (`Tokenizer.encode_prompt`).

Models trained by `train_sentencepiece` round-trip any text exactly:
- byte_fallback: a character outside the vocabulary becomes its UTF-8 byte pieces, never <unk>;
- identity normalization, no dummy prefix, no whitespace folding: the pieces spell the text;
- special tokens are control symbols: SentencePiece never produces them from text, so a document
  that contains the string "<|endoftext|>" cannot forge a document boundary; `encode` inserts
  them where they are allowed (see `Tokenizer.encode`);
- a literal "▁" (U+2581, SentencePiece's own space mark) in the text is encoded as its byte pieces,
  since SentencePiece itself would decode it as a space.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece

from llmjax.tokenizer.base import ENDOFTEXT, SpecialIds, Tokenizer, TokenizerError

SPACE_SYMBOL = "\u2581"  # "▁": how SentencePiece writes a space inside pieces
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
MODEL_TYPES = ("bpe", "unigram")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (serialized `ModelProto` bytes) as a `Tokenizer`.

    Special tokens are the model's control and user-defined symbols ("<s>", "</s>",
    "<|endoftext|>", ...). `eot_id` is "<|endoftext|>" when the model has it, else the model's
    end-of-sentence id ("</s>" in LLaMA's tokenizer), so any model can separate documents.
    special_ids: the BOS / EOS / unknown / padding ids and the add-BOS / add-EOS rule of the model
    file this came from (see `encode_prompt`); none for models trained here or plain `.model` files.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, special_ids: SpecialIds | None = None):
        self.model_proto = bytes(model_proto)
        self.processor = load_processor(self.model_proto)
        piece_types = read_piece_types(self.model_proto)  # [vocab_size]
        if len(piece_types) != self.processor.get_piece_size():
            raise TokenizerError(
                f"SentencePiece model lists {len(piece_types)} pieces but loads {self.processor.get_piece_size()}"
            )
        self._special_tokens = special_pieces(piece_types, self.processor)
        self._special_token_ids = frozenset(self._special_tokens.values())
        self._special_ids = (special_ids or SpecialIds()).check(len(piece_types))
        self._piece_bytes = piece_byte_table(piece_types, self.processor)  # [vocab_size] bytes
        self._strips_leading_space = strips_leading_space(piece_types, self.processor)
        # Ordinary pieces that start with a space: the ones a dummy-prefix model strips at the start.
        self._leading_space_ids = frozenset(
            i for i, kind in enumerate(piece_types) if kind == NORMAL and self._piece_bytes[i][:1] == b" "
        )
        self._space_symbol_byte_ids = space_symbol_byte_ids(self.processor)

    @classmethod
    def load(cls, path: str | Path) -> SentencePieceTokenizer:
        """Read a SentencePiece `.model` file (or our JSON, by its "type" field)."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"no SentencePiece model at {path}")
        raw = path.read_bytes()
        if raw.lstrip()[:1] == b"{":
            return cls.from_json(json.loads(raw))
        try:
            return cls(raw)
        except TokenizerError as error:
            raise TokenizerError(f"{path}: {error}") from None

    def save_model(self, path: str | Path) -> None:
        """Write the plain `.model` file (for `spm_encode` or `SentencePieceProcessor(model_file=)`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(self.model_proto)
        temporary.replace(path)

    # --- Tokenizer interface ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def eot_id(self) -> int | None:
        if ENDOFTEXT in self._special_tokens:
            return self._special_tokens[ENDOFTEXT]
        eos_id = self.processor.eos_id()
        return eos_id if eos_id >= 0 else None

    @property
    def special_ids(self) -> SpecialIds:
        """BOS / EOS / unknown / padding ids and whether prompts get BOS / EOS added (as the model file says)."""
        return self._special_ids

    def encode_ordinary(self, text: str) -> list[int]:
        if SPACE_SYMBOL in text and self._space_symbol_byte_ids and not self._strips_leading_space:
            return encode_around_space_symbol(self.processor, text, self._space_symbol_byte_ids)
        return self.processor.encode(text)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes: byte-fallback pieces become their byte, "▁" a space, special tokens
        their text. A model with a dummy prefix drops the space it added, as SentencePiece does:
        one leading space of each ordinary piece until some text has come out."""
        out = bytearray()
        at_start = self._strips_leading_space
        table = self._piece_bytes
        for token_id in ids:
            if not 0 <= token_id < len(table):
                raise TokenizerError(f"token id {token_id} is outside this SentencePiece vocabulary (ids 0..{len(table) - 1})")
            piece = table[token_id]
            if at_start and token_id not in self._special_token_ids:
                if token_id in self._leading_space_ids:
                    piece = piece[1:]
                at_start = not piece
            out += piece
        return bytes(out)

    def to_json(self) -> dict:
        """{"type", "version", "model_proto": the base64 .model file, and "special_ids" when any is set}."""
        roles = {} if self._special_ids == SpecialIds() else {"special_ids": dataclasses.asdict(self._special_ids)}
        return {"type": self.kind, "version": 1, "model_proto": base64.b64encode(self.model_proto).decode("ascii"),
                **roles}

    @classmethod
    def from_json(cls, data: dict) -> SentencePieceTokenizer:
        if data.get("type") != cls.kind:
            raise TokenizerError(f"not a SentencePiece tokenizer: its JSON has type {data.get('type')!r}, expected {cls.kind!r}")
        if "model_proto" not in data:
            raise TokenizerError("SentencePiece tokenizer JSON lacks its 'model_proto' field (the base64 .model file)")
        return cls(base64.b64decode(data["model_proto"]), special_ids_from_json(data))

    # Pickled as the model bytes and the special ids: the wrapped processor is a C++ object
    # (workers of the data pipeline receive tokenizers by pickle).
    def __getstate__(self) -> dict:
        return {"model_proto": self.model_proto, "special_ids": self._special_ids}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"], state.get("special_ids"))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, specials={sorted(self._special_tokens)})"


def special_ids_from_json(data: dict) -> SpecialIds:
    """The "special_ids" field of our JSON (absent: none set); a malformed one is a TokenizerError."""
    try:
        return SpecialIds(**data.get("special_ids", {}))
    except TypeError as error:
        raise TokenizerError(f"SentencePiece tokenizer JSON has a malformed 'special_ids' field ({error})") from None


# --- reading a model ------------------------------------------------------------------------


def load_processor(model_proto: bytes) -> sentencepiece.SentencePieceProcessor:
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError) as error:
        raise TokenizerError(f"not a SentencePiece model ({len(model_proto)} bytes could not be parsed: {error})") from None
    return processor


# Piece types of SentencePiece's ModelProto (sentencepiece_model.proto, SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def special_pieces(piece_types: list[int], processor: sentencepiece.SentencePieceProcessor) -> dict[str, int]:
    """{piece: id} of the control and user-defined symbols (<unk> and byte pieces excluded)."""
    return {processor.id_to_piece(i): i for i, kind in enumerate(piece_types) if kind in (CONTROL, USER_DEFINED)}


def read_piece_types(model_proto: bytes) -> list[int]:
    """The type of every piece, by id, read from the serialized ModelProto.

    The Python processor has no `is_user_defined`, and the protobuf package is not a dependency,
    so this walks the protobuf wire format: ModelProto field 1 is the repeated SentencePiece
    message, whose field 3 is its type (NORMAL when absent).
    """
    types = []
    for field, value in protobuf_fields(model_proto):
        if field == 1:
            kind = NORMAL
            for piece_field, piece_value in protobuf_fields(value):
                if piece_field == 3:
                    kind = piece_value
            types.append(kind)
    return types


def protobuf_fields(message: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of one protobuf message: ints for varints, bytes otherwise."""
    position = 0
    while position < len(message):
        key, position = read_varint(message, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = read_varint(message, position)
        elif wire_type == 1:
            value, position = message[position : position + 8], position + 8
        elif wire_type == 2:
            length, position = read_varint(message, position)
            value, position = message[position : position + length], position + length
        elif wire_type == 5:
            value, position = message[position : position + 4], position + 4
        else:
            raise TokenizerError(f"not a SentencePiece model: protobuf wire type {wire_type} at byte {position}")
        if position > len(message):
            raise TokenizerError("not a SentencePiece model: its protobuf message is truncated")
        yield field, value


def read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data):
            raise TokenizerError("not a SentencePiece model: its protobuf message is truncated")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def piece_byte_table(piece_types: list[int], processor: sentencepiece.SentencePieceProcessor) -> list[bytes]:
    """The bytes each id stands for, by id: [vocab_size] of bytes. Special tokens stand for their
    own text (as in every other tokenizer here); SentencePiece would decode control symbols to ""."""
    table = []
    for token_id, kind in enumerate(piece_types):
        piece = processor.id_to_piece(token_id)
        if kind == BYTE:
            table.append(bytes([int(BYTE_PIECE.fullmatch(piece).group(1), 16)]))
        elif kind in (CONTROL, USER_DEFINED):
            table.append(piece.encode())
        elif kind == UNKNOWN:
            table.append(processor.decode([token_id]).encode())  # the model's unk surface, " ⁇ "
        elif kind == UNUSED:
            table.append(b"")
        else:
            table.append(piece.replace(SPACE_SYMBOL, " ").encode())
    return table


def strips_leading_space(piece_types: list[int], processor: sentencepiece.SentencePieceProcessor) -> bool:
    """Whether decoding drops the space that starts the text (models with a dummy prefix or
    whitespace folding, e.g. LLaMA's), probed on the first ordinary piece that starts with "▁"."""
    for token_id, kind in enumerate(piece_types):
        piece = processor.id_to_piece(token_id)
        if kind == NORMAL and piece.startswith(SPACE_SYMBOL):
            return processor.decode([token_id]) != piece.replace(SPACE_SYMBOL, " ")
    return False


def space_symbol_byte_ids(processor: sentencepiece.SentencePieceProcessor) -> list[int]:
    """Byte-piece ids spelling "▁" in UTF-8 (empty when the model has no byte fallback)."""
    ids = [processor.piece_to_id(f"<0x{byte:02X}>") for byte in SPACE_SYMBOL.encode()]
    return ids if all(processor.is_byte(i) for i in ids) else []


def encode_around_space_symbol(processor: sentencepiece.SentencePieceProcessor, text: str, symbol_ids: list[int]) -> list[int]:
    """Encode text whose literal "▁" characters must survive decoding: each becomes its bytes."""
    ids: list[int] = []
    for index, part in enumerate(text.split(SPACE_SYMBOL)):
        if index:
            ids.extend(symbol_ids)
        if part:
            ids.extend(processor.encode(part))
    return ids


# --- training -------------------------------------------------------------------------------


def train_sentencepiece(
    corpus: Iterable[str],
    vocab_size: int,
    *,
    model_type: str = "bpe",
    special_tokens: Iterable[str] = (ENDOFTEXT,),
    character_coverage: float = 0.9995,
    max_sentence_bytes: int = 8192,
    max_sentences: int = 0,
    num_threads: int | None = None,
    **trainer_options,
) -> SentencePieceTokenizer:
    """Train a SentencePiece BPE or unigram model in-process on an iterable of texts.

    corpus: documents (any length); each is cut at line ends into training sentences of at most
        `max_sentence_bytes` UTF-8 bytes (SentencePiece skips longer sentences).
    vocab_size: all ids, counting <unk> (id 0), the special tokens (ids 1..), the 256 byte
        pieces, and the learned pieces.
    max_sentences: train on a random sample of this many sentences (0: all of them).
    trainer_options: any other `SentencePieceTrainer` flag (e.g. split_digits=False), overriding ours.
    """
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"model_type must be one of {MODEL_TYPES}, not {model_type!r}")
    special_tokens = list(dict.fromkeys(special_tokens))
    if any(not isinstance(s, str) or not s for s in special_tokens):
        raise TokenizerError(f"special tokens must be non-empty strings, got {special_tokens!r}")
    minimum = 1 + len(special_tokens) + 256 + 1
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size {vocab_size} leaves no room to learn pieces: <unk>, {len(special_tokens)} special tokens and "
            f"256 byte pieces already take {minimum - 1} ids; use at least {minimum}"
        )
    options = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        control_symbols=special_tokens,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=character_coverage,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        max_sentence_length=max_sentence_bytes,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    options.update(trainer_options)
    sentences = _RecordingIterator(training_sentences(corpus, max_sentence_bytes))
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, **options)
    except RuntimeError as error:
        if sentences.error is not None:  # our corpus failed (a bad file...): raise its own error
            raise sentences.error from None
        if sentences.count == 0:
            raise TokenizerError("cannot train SentencePiece on an empty corpus: it yielded no text") from None
        raise TokenizerError(f"SentencePiece training failed: {spm_message(error)}") from None
    return SentencePieceTokenizer(model.getvalue())


def training_sentences(corpus: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Cut each document at line ends into chunks of at most max_bytes UTF-8 bytes (lines kept
    whole with their "\\n"; a longer line is cut at character boundaries)."""
    for document in corpus:
        chunk: list[str] = []
        size = 0
        for line in document.splitlines(keepends=True):
            line_size = len(line.encode("utf-8", errors="replace"))
            if size + line_size > max_bytes and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            if line_size > max_bytes:
                yield from cut_to_bytes(line, max_bytes)
                continue
            chunk.append(line)
            size += line_size
        if chunk:
            yield "".join(chunk)


def cut_to_bytes(text: str, max_bytes: int) -> Iterator[str]:
    """Pieces of text of at most max_bytes UTF-8 bytes each, cut between characters."""
    start = 0
    while start < len(text):
        stop = min(len(text), start + max_bytes)  # a character is at least one byte
        while len(text[start:stop].encode("utf-8", errors="replace")) > max_bytes:
            stop -= max(1, (stop - start) // 8)
        yield text[start:stop]
        start = stop


def spm_message(error: Exception) -> str:
    """SentencePiece's own explanation, without its C++ source location."""
    message = str(error).strip()
    return message.split("] ", 1)[1] if "] " in message else message


class _RecordingIterator:
    """Counts sentences and keeps the exception our corpus raised (SentencePiece would turn it
    into a RuntimeError with only its text)."""

    def __init__(self, sentences: Iterator[str]):
        self.sentences = sentences
        self.count = 0
        self.error: BaseException | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            sentence = next(self.sentences)
        except StopIteration:
            raise
        except BaseException as error:
            self.error = error
            raise
        self.count += 1
        return sentence
