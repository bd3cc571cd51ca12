"""Chat data for supervised fine-tuning: conversations -> token ids with an assistant mask -> packed training rows.

    conversations = read_conversations("chats.jsonl")                  # [{"role", "content"}, ...] per line
    chats = tokenize_conversations(conversations, tokenizer, chat_format)   # ids + which ids are assistant replies
    packed = pack_conversations(chats, seq_len=2048)                    # rows of whole conversations, numpy arrays
    for batch in batches(packed, batch_size=16, seed=0, epoch=0):      # {"inputs", "targets", "positions",
        state, metrics = train_step(state, batch)                      #  "segment_ids", "loss_mask"}: train.step's

The data flow and its choices:

- JSONL -> messages. One conversation per line, {"messages": [{"role": "system" | "user" | "assistant",
  "content": str}, ...]}; other keys of the line (and of a message) are dropped. Every problem is a
  `ChatDataError` naming the file and line.
- messages -> text -> ids + assistant mask. The conversation is rendered with the model's chat template
  (`llmjax.tokenizer.chat.ChatFormat`) turn by turn, exactly as inference sees it: before assistant message k the
  prompt is render(messages[:k], add_generation_prompt=True), which ends with the assistant's turn opened; the reply
  is what render(messages[:k + 1], add_generation_prompt=False) adds after it: the reply text and the template's
  end-of-turn markup ("<|im_end|>\n" in ChatML), so the model learns to stop. Only those reply pieces carry loss;
  system and user turns and the assistant header are context. Each piece is tokenized on its own (prompt pieces as a
  prompt is at inference; a reply's tokens follow the prompt's, as generated tokens do), the first with the model
  file's BOS rule (`Tokenizer.encode_prompt`) but never its EOS rule: a conversation ends where its template ends it.
  A template that rewrites earlier turns when a turn is added (one that drops earlier reasoning, or counts the
  messages) cannot be split this way and is refused.
- ids -> packed rows. Whole conversations are packed into rows of seq_len + 1 tokens by best-fit decreasing (longest
  first, each into the fullest row that still has room: fill close to the optimum, deterministic); a conversation
  longer than a row is skipped and counted, never cut (a cut reply teaches the model to stop mid-sentence or to
  answer a question it cannot see). Within a row each conversation is its own segment: segment ids 1, 2, ... and
  positions from 0, so attention never crosses conversations (`llmjax.data.loader.packed_layout`'s convention);
  padding is segment 0, which no conversation has, so the model's segment mask (equal ids only) keeps it out of
  every conversation's attention.
- rows -> batches. inputs = row[:-1], targets = row[1:], loss_mask 1 where the target is an assistant token of the
  same conversation as the input token; `batches` deals the rows in a fresh order per (seed, epoch), and the last
  partial batch of an epoch is dropped (every batch has the same shape: one compilation).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmjax.tokenizer.base import Tokenizer
from llmjax.tokenizer.chat import ChatFormat, ChatTemplateError

ROLES = ("system", "user", "assistant")
PADDING_SEGMENT = 0  # the model attends only within equal segment ids; conversations are 1, 2, ...


class ChatDataError(ValueError):
    """Chat data that cannot be trained on: a malformed JSONL line, a conversation the template refuses, nothing that
    fits a row."""


# --- JSONL -> conversations -------------------------------------------------------------------------------------


def jsonl_records(path: Path):
    """(where, record) for every non-blank line of a JSONL file, where = "PATH, line N"; ChatDataError naming the line
    for text that is not UTF-8 or not JSON."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ChatDataError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise ChatDataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The conversations of a JSONL file, one per non-blank line as {"messages": [{"role", "content"}, ...]}; each
    message is returned as {"role", "content"} only. ChatDataError naming the file and line for anything else, and
    for a file without any conversation."""
    path = Path(path)
    conversations = []
    for where, record in jsonl_records(path):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list):
            raise ChatDataError(f'{where}: expected an object with a "messages" list, '
                                'e.g. {"messages": [{"role": "user", "content": "..."}, ...]}')
        conversations.append(check_conversation(messages, where))
    if not conversations:
        raise ChatDataError(f"{path} holds no conversations (one JSON object per line, "
                            '{"messages": [{"role": ..., "content": ...}, ...]})')
    return conversations


def check_conversation(messages: Sequence, where: str = "conversation") -> list[dict]:
    """The messages as [{"role", "content"}], after checking each has a known role and string content and that an
    assistant replies at least once (else nothing would be trained); ChatDataError prefixed with `where`."""
    checked = []
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and "role" in message and "content" in message):
            raise ChatDataError(f'{where}: message {index} needs a "role" and a "content", got {_short(message)}')
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ChatDataError(f"{where}: message {index} has the role {_short(role)}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ChatDataError(f"{where}: message {index} ({role}) has content {_short(content)}; expected a string")
        checked.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in checked):
        raise ChatDataError(f"{where}: no assistant message, so nothing to train on")
    return checked


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- messages -> ids + assistant mask ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedChat:
    """One conversation as the model reads it: ids, and per id whether it is part of an assistant reply (the reply
    text and the end-of-turn markup after it: the tokens trained on)."""

    ids: list[int]
    assistant: list[bool]

    def __post_init__(self):
        if len(self.ids) != len(self.assistant):
            raise ValueError(f"{len(self.ids)} ids but {len(self.assistant)} assistant flags")

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_conversation(messages: Sequence[dict], tokenizer: Tokenizer, chat_format: ChatFormat, *,
                          index: int | None = None) -> TokenizedChat:
    """The conversation's ids and assistant mask (see the module docstring): rendered turn by turn, each piece
    tokenized on its own with special tokens as their ids, the first with the tokenizer's BOS rule (no EOS).
    ChatDataError (naming the conversation `index`, when given) when the template refuses the messages or does not
    render them incrementally."""
    name = "conversation" if index is None else f"conversation {index}"
    messages = check_conversation(messages, name)

    def render(part, add_generation_prompt):
        try:
            return chat_format.render(part, add_generation_prompt=add_generation_prompt)
        except ChatTemplateError as error:
            raise ChatDataError(f"{name}: {error}") from None

    def not_incremental(shorter: str, longer: str, what: str):
        at = next((i for i, (a, b) in enumerate(zip(shorter, longer, strict=False)) if a != b), len(longer))
        return ChatDataError(
            f"{name}: the chat template does not render conversations incrementally: {what} is not a prefix of "
            f"what follows it (they part at character {at}: {shorter[at:at + 30]!r} vs {longer[at:at + 30]!r}). "
            "A template that rewrites earlier turns as the conversation grows (counts the messages, drops earlier "
            "reasoning, adds a system message only sometimes) cannot be trained on turn by turn; use a template "
            "that renders each turn the same way whatever follows it")

    pieces: list[tuple[str, bool]] = []  # (text, trained)
    done = ""  # the text rendered so far
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:k], True)
        full = render(messages[: k + 1], False)
        if not prompt.startswith(done):
            raise not_incremental(done, prompt, f"the conversation up to message {k - 1}")
        if not full.startswith(prompt):
            raise not_incremental(prompt, full, f"the prompt for assistant message {k}")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    final = render(messages, False)
    if not final.startswith(done):
        raise not_incremental(done, final, "the conversation up to its last assistant message")
    pieces.append((final[len(done):], False))

    no_eos = dataclasses.replace(tokenizer.special_ids, add_eos=False)
    ids: list[int] = []
    assistant: list[bool] = []
    for number, (text, trained) in enumerate(pieces):
        piece = tokenizer.encode(text) if text else []
        if number == 0:
            piece = no_eos.around(piece)  # BOS in front where the model file says (not doubled if the template wrote it)
        ids += piece
        assistant += [trained] * len(piece)
    return TokenizedChat(ids, assistant)


def tokenize_conversations(conversations: Sequence[Sequence[dict]], tokenizer: Tokenizer,
                           chat_format: ChatFormat) -> list[TokenizedChat]:
    """`tokenize_conversation` of each, errors naming the conversation's index."""
    return [tokenize_conversation(messages, tokenizer, chat_format, index=index)
            for index, messages in enumerate(conversations)]


# --- ids -> packed rows -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackStats:
    """What packing did: conversations given, packed, skipped for being longer than a row; rows; the conversations'
    tokens in them; assistant tokens trained on (loss_mask's sum: an assistant token that is some input's target);
    fill = tokens / (rows * (seq_len + 1))."""

    conversations: int
    packed: int
    skipped_too_long: int
    rows: int
    tokens: int
    assistant_tokens: int
    fill: float


@dataclass(frozen=True)
class PackedChats:
    """Packed rows for train.step, each array [rows, seq_len]: inputs / targets / positions / segment_ids int32,
    loss_mask float32; placement[r]: the indices (into the list given to `pack_conversations`) of row r's
    conversations, in row order."""

    inputs: np.ndarray
    targets: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    loss_mask: np.ndarray
    placement: tuple[tuple[int, ...], ...]
    stats: PackStats

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def rows(self, indices) -> dict[str, np.ndarray]:
        """The batch dict of the given rows: {"inputs", "targets", "positions", "segment_ids", "loss_mask"}."""
        return {name: getattr(self, name)[indices] for name in BATCH_KEYS}

    def batch(self, step: int, *, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """The batch of training step `step` (a `llmjax.data.loader.BatchSource`, so `llmjax.train.loop.train` reads
        it): epoch step // batches_per_epoch, in that epoch's order (see `batches`)."""
        per_epoch = batches_per_epoch(self, batch_size)
        epoch, index = divmod(step, per_epoch)
        return next(batches(self, batch_size, seed=seed, epoch=epoch, start=index))


BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def pack_conversations(chats: Sequence[TokenizedChat], seq_len: int, *, seed: int = 0, shuffle: bool = True,
                       pad_id: int = 0) -> PackedChats:
    """Whole conversations packed into rows of seq_len + 1 tokens (inputs and targets are its two seq_len views).

    Best-fit decreasing: conversations longest first (ties in the given order), each into the row with the least room
    that still holds it, else a new row. shuffle: the rows then come in a seeded random order (else longest-first
    order); `batches` reorders them per epoch anyway. Conversations longer than seq_len + 1 are skipped and counted
    in `stats`; ChatDataError when none fits. Padding: token pad_id, segment 0, position 0, loss_mask 0."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    width = seq_len + 1
    fitting = [i for i, chat in enumerate(chats) if 0 < len(chat) <= width]
    if not fitting:
        longest = max((len(chat) for chat in chats), default=0)
        raise ChatDataError(f"no conversation fits a row of seq_len + 1 = {width} tokens (of {len(chats)}, the "
                            f"longest has {longest} tokens); raise seq_len or shorten the conversations")

    placement = _best_fit_decreasing([len(chats[i]) for i in fitting], width)
    placement = [[fitting[j] for j in row] for row in placement]
    if shuffle:
        order = np.random.default_rng(_seed_sequence(seed)).permutation(len(placement))
        placement = [placement[r] for r in order]

    rows = len(placement)
    tokens = np.full((rows, width), pad_id, np.int32)
    segments = np.full((rows, width), PADDING_SEGMENT, np.int32)
    positions = np.zeros((rows, width), np.int32)
    assistant = np.zeros((rows, width), np.bool_)
    for r, row in enumerate(placement):
        start = 0
        for segment, i in enumerate(row, start=1):
            chat, end = chats[i], start + len(chats[i])
            tokens[r, start:end] = chat.ids
            segments[r, start:end] = segment
            positions[r, start:end] = np.arange(len(chat))
            assistant[r, start:end] = chat.assistant
            start = end

    same_conversation = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != PADDING_SEGMENT)
    loss_mask = (assistant[:, 1:] & same_conversation).astype(np.float32)  # [rows, seq_len]
    packed_tokens = sum(len(chats[i]) for i in fitting)
    stats = PackStats(conversations=len(chats), packed=len(fitting), skipped_too_long=len(chats) - len(fitting),
                      rows=rows, tokens=packed_tokens, assistant_tokens=int(loss_mask.sum()),
                      fill=packed_tokens / (rows * width))
    return PackedChats(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=positions[:, :-1],
                       segment_ids=segments[:, :-1], loss_mask=loss_mask,
                       placement=tuple(tuple(row) for row in placement), stats=stats)


def _best_fit_decreasing(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Rows of item indices: each item, longest first, into the row with the least room that holds it.
    Rows are kept in buckets by their free room, so a placement costs a bisect over the distinct room sizes."""
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free room -> rows with exactly that much
    rooms: list[int] = []  # the sorted keys of by_room
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[item]
        at = bisect.bisect_left(rooms, length)
        if at < len(rooms):
            room = rooms[at]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room], rooms[at]
        else:
            room, row = width, len(rows)
            rows.append([])
        rows[row].append(item)
        left = room - length
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(row)
    return rows


# --- rows -> batches --------------------------------------------------------------------------------------------


def batches_per_epoch(packed: PackedChats, batch_size: int) -> int:
    """Full batches in one pass over the rows (the last partial batch is dropped); ChatDataError for none."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(packed) < batch_size:
        raise ChatDataError(f"{len(packed)} packed rows make no batch of {batch_size}; "
                            "lower batch_size or give more conversations")
    return len(packed) // batch_size


def batches(packed: PackedChats, batch_size: int, *, seed: int, epoch: int, start: int = 0
            ) -> Iterator[dict[str, np.ndarray]]:
    """Batch dicts of batch_size rows ({"inputs", "targets", "positions", "segment_ids" [batch, seq_len] int32,
    "loss_mask" float32}), in an order fixed by (seed, epoch); the last partial batch is dropped, so every batch has
    one shape. start: begin at that batch of the epoch (a resumed run skips what it has trained on).
    ChatDataError when there are fewer rows than one batch."""
    per_epoch = batches_per_epoch(packed, batch_size)
    order = np.random.default_rng(_seed_sequence(seed, epoch)).permutation(len(packed))
    for step in range(start, per_epoch):
        yield packed.rows(order[step * batch_size:(step + 1) * batch_size])


def _seed_sequence(*numbers: int) -> list[int]:
    for number in numbers:
        if not (isinstance(number, (int, np.integer)) and number >= 0):
            raise ValueError(f"seeds and epochs are non-negative integers, got {number!r}")
    return [int(number) for number in numbers]
