"""Chat data for SFT: JSONL reading, turn-by-turn tokenization with the assistant mask, packing and batches."""

import json

import numpy as np
import pytest

from llmjax.posttrain.chat_data import (
    ChatDataError,
    TokenizedChat,
    batches,
    batches_per_epoch,
    pack_conversations,
    read_conversations,
    tokenize_conversation,
    tokenize_conversations,
)
from llmjax.tokenizer.base import SpecialIds
from llmjax.tokenizer.bpe import BPETokenizer
from llmjax.tokenizer.bytes import ByteTokenizer
from llmjax.tokenizer.chat import ChatFormat

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258, "<s>": 259, "</s>": 260}

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3 + 3?"},
     {"role": "assistant", "content": "6, naturally."}],
    [{"role": "user", "content": "Say hi in French."},
     {"role": "assistant", "content": "Salut ! Ça va ?"}],
    [{"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Thanks."}],  # a conversation may end with a user turn: it is context only
]


def byte_chatml_tokenizer(**special_ids) -> BPETokenizer:
    """Bytes plus the ChatML special tokens (and <s> / </s> for the BOS / EOS rule): a real, cheap tokenizer."""
    return BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=SPECIALS,
                        special_ids=SpecialIds(**special_ids) if special_ids else None)


def masked_runs(tokenizer, chat: TokenizedChat) -> list[str]:
    """The text of each run of consecutive assistant tokens."""
    runs, current = [], []
    for token, trained in zip(chat.ids, chat.assistant, strict=True):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def replies(messages) -> list[str]:
    return [message["content"] for message in messages if message["role"] == "assistant"]


# --- read_conversations -----------------------------------------------------------------------------------------


def test_read_conversations_reads_messages_and_skips_blank_lines(tmp_path):
    path = tmp_path / "chats.jsonl"
    lines = [json.dumps({"messages": messages, "source": "test"}) for messages in CONVERSATIONS]
    path.write_text(lines[0] + "\n\n   \n" + "\n".join(lines[1:]) + "\n")
    assert read_conversations(path) == CONVERSATIONS


@pytest.mark.parametrize("line, problem", [
    ('{"messages": [', "not valid JSON"),
    ('{"conversation": []}', '"messages" list'),
    ('[1, 2]', '"messages" list'),
    ('{"messages": [{"role": "user"}]}', 'needs a "role" and a "content"'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "has the role 'robot'"),
    ('{"messages": [{"role": "assistant", "content": ["x"]}]}', "expected a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
])
def test_read_conversations_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": CONVERSATIONS[1]})
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(ChatDataError, match=problem) as error:
        read_conversations(path)
    assert f"{path}, line 3" in str(error.value)


def test_read_conversations_refuses_an_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ChatDataError, match="holds no conversations"):
        read_conversations(tmp_path / "empty.jsonl")


# --- tokenize_conversation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["chatml", "default"])
def test_tokenized_conversation_is_the_render_and_the_mask_is_the_replies(template):
    tokenizer = byte_chatml_tokenizer() if template == "chatml" else ByteTokenizer()
    chat = ChatFormat.create(CHATML) if template == "chatml" else ChatFormat()
    end_of_turn = "<|im_end|>\n" if template == "chatml" else "\n\n"
    for messages in CONVERSATIONS:
        tokenized = tokenize_conversation(messages, tokenizer, chat)
        assert tokenizer.decode(tokenized.ids) == chat.render(messages, add_generation_prompt=False)
        expected = [(" " if template == "default" else "") + reply + end_of_turn for reply in replies(messages)]
        assert masked_runs(tokenizer, tokenized) == expected
    if template == "chatml":  # the template's special tokens are single ids, in the mask where they end a reply
        tokenized = tokenize_conversation(CONVERSATIONS[1], tokenizer, chat)
        assert tokenized.ids.count(257) == 2 and tokenized.ids.count(258) == 2
        end = tokenized.ids.index(258, tokenized.ids.index(258) + 1)
        assert tokenized.assistant[end] and not tokenized.assistant[tokenized.ids.index(257, 1)]


def test_first_piece_gets_bos_and_no_eos_in_the_middle():
    tokenizer = byte_chatml_tokenizer(bos=259, eos=260, add_bos=True, add_eos=True)
    chat = ChatFormat.create(CHATML)
    tokenized = tokenize_conversation(CONVERSATIONS[0], tokenizer, chat)
    assert tokenized.ids[0] == 259 and tokenized.ids.count(259) == 1 and 260 not in tokenized.ids
    assert tokenizer.decode(tokenized.ids[1:]) == chat.render(CONVERSATIONS[0], add_generation_prompt=False)
    # A template that writes the BOS itself does not get a second one.
    writes_bos = ChatFormat.create("{{ bos_token }}" + CHATML, bos_token="<s>")
    assert tokenize_conversation(CONVERSATIONS[0], tokenizer, writes_bos).ids == tokenized.ids


def test_a_template_that_is_not_incremental_is_refused():
    counts = ChatFormat.create("{{ messages | length }}\n" + CHATML)
    with pytest.raises(ChatDataError, match="conversation 4: the chat template does not render conversations incr"):
        tokenize_conversation(CONVERSATIONS[1], byte_chatml_tokenizer(), counts, index=4)
    # One that drops earlier replies when a later turn follows (as reasoning templates drop earlier thoughts).
    drops = ChatFormat.create(
        "{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}[reply]"
        "{% else %}{{ message['role'] }}: {{ message['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ChatDataError, match="incrementally"):
        tokenize_conversation(CONVERSATIONS[0], ByteTokenizer(), drops)


def test_a_template_refusal_names_the_conversation():
    no_system = ChatFormat.create("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
                                  "{% endif %}" + CHATML)
    conversations = [CONVERSATIONS[1], CONVERSATIONS[0]]
    with pytest.raises(ChatDataError, match="conversation 1: .*no system role"):
        tokenize_conversations(conversations, byte_chatml_tokenizer(), no_system)


def test_smollm2_mask_is_the_replies_and_im_end(smollm2_path):
    from llmjax.io.gguf import read_metadata
    from llmjax.tokenizer.gguf import tokenizer_from_gguf

    tokenizer, chat = tokenizer_from_gguf(smollm2_path), ChatFormat.from_gguf(read_metadata(smollm2_path))
    im_start, im_end = tokenizer.special_tokens["<|im_start|>"], tokenizer.special_tokens["<|im_end|>"]
    for messages in CONVERSATIONS:
        tokenized = tokenize_conversation(messages, tokenizer, chat)
        assert tokenizer.decode(tokenized.ids) == chat.render(messages, add_generation_prompt=False)
        assert masked_runs(tokenizer, tokenized) == [reply + "<|im_end|>\n" for reply in replies(messages)]
        trained = [token for token, flag in zip(tokenized.ids, tokenized.assistant, strict=True) if flag]
        assert trained.count(im_end) == len(replies(messages)) and im_start not in trained
        # Each reply is tokenized as the model generates it: after the prompt's ids, which are the prompt's own.
        k = next(i for i, message in enumerate(messages) if message["role"] == "assistant")
        prompt_ids = tokenizer.encode_prompt(chat.render(messages[:k]))
        assert tokenized.ids[: len(prompt_ids)] == prompt_ids and tokenized.assistant[len(prompt_ids)]
        assert not any(tokenized.assistant[: len(prompt_ids)])


# --- packing ----------------------------------------------------------------------------------------------------


def random_chats(count: int, seed: int = 0) -> list[TokenizedChat]:
    """Conversations of random lengths whose ids name them (conversation i's ids are all 1000 + i) and whose
    assistant flags alternate in random runs (some start with one: a template may render nothing before a reply)."""
    rng = np.random.default_rng(seed)
    chats = []
    for i in range(count):
        length = int(rng.integers(2, 40))
        assistant = (np.cumsum(rng.random(length) < 0.3) % 2 == 1).tolist()
        chats.append(TokenizedChat([1000 + i] * length, assistant))
    return chats


def row_tokens(packed, r: int) -> np.ndarray:
    return np.concatenate([packed.inputs[r], packed.targets[r, -1:]])  # [seq_len + 1]


def test_packing_keeps_each_conversation_whole_in_one_row():
    chats = random_chats(60) + [TokenizedChat([7] * 50, [False] * 49 + [True])]  # 50 > seq_len + 1: skipped
    seq_len = 47
    packed = pack_conversations(chats, seq_len, seed=3)
    stats = packed.stats
    assert (stats.conversations, stats.packed, stats.skipped_too_long) == (61, 60, 1)
    assert sorted(i for row in packed.placement for i in row) == list(range(60))
    assert stats.tokens == sum(len(chat) for chat in chats[:60]) and stats.rows == len(packed)
    assert stats.fill == stats.tokens / (stats.rows * (seq_len + 1)) and stats.fill > 0.9
    assert stats.assistant_tokens == packed.loss_mask.sum()
    for name in ("inputs", "targets", "positions", "segment_ids"):
        assert getattr(packed, name).dtype == np.int32 and getattr(packed, name).shape == (len(packed), seq_len)
    assert packed.loss_mask.dtype == np.float32 and packed.loss_mask.shape == (len(packed), seq_len)

    for r, row in enumerate(packed.placement):
        tokens = row_tokens(packed, r)
        start = 0
        for segment, i in enumerate(row, start=1):
            chat, end = chats[i], start + len(chats[i])
            assert tokens[start:end].tolist() == chat.ids
            inputs_end = min(end, seq_len)  # the inputs' view of this conversation
            assert (packed.segment_ids[r, start:inputs_end] == segment).all()
            assert packed.positions[r, start:inputs_end].tolist() == list(range(inputs_end - start))
            # loss on target t + 1 exactly where it is an assistant token of this conversation
            expected = np.array(chat.assistant[1:], np.float32)[: max(inputs_end - start, 0)]
            assert packed.loss_mask[r, start:start + len(expected)].tolist() == expected.tolist()
            if end <= seq_len:  # the conversation's last token is an input whose target is another's, or padding
                assert packed.loss_mask[r, end - 1] == 0
            start = end
        # padding: segment 0 (no conversation's), position 0, never in the loss
        assert (packed.segment_ids[r, start:] == 0).all() and (packed.positions[r, start:] == 0).all()
        assert (packed.loss_mask[r, max(start - 1, 0):] == 0).all()


def test_loss_mask_is_zero_wherever_the_target_is_not_an_assistant_token():
    tokenizer, chat = byte_chatml_tokenizer(), ChatFormat.create(CHATML)
    chats = tokenize_conversations(CONVERSATIONS * 3, tokenizer, chat)
    packed = pack_conversations(chats, 128, shuffle=False)
    assistant_ids = {(i, position) for i, c in enumerate(chats) for position, flag in enumerate(c.assistant) if flag}
    for r, row in enumerate(packed.placement):
        owner = np.concatenate([[i] * len(chats[i]) for i in row] + [[-1] * (129 - sum(len(chats[i]) for i in row))])
        for t in range(128):  # target t is token t + 1 of the row
            target_owner, target_position = owner[t + 1], packed.positions[r, t] + 1
            is_assistant_target = (target_owner == owner[t] != -1
                                   and (target_owner, target_position) in assistant_ids)
            assert packed.loss_mask[r, t] == float(is_assistant_target), (r, t)
    # The trained targets decode to the replies and their end-of-turn markup, nothing else.
    trained = packed.targets[packed.loss_mask == 1]
    assert len(trained) == sum(sum(c.assistant) for c in chats)
    assert tokenizer.decode(trained.tolist()).count("<|im_end|>") == 3 * 4


def test_nothing_fits_names_the_longest():
    with pytest.raises(ChatDataError, match=r"seq_len \+ 1 = 9 tokens .* longest has 12 tokens"):
        pack_conversations([TokenizedChat([1] * 12, [True] * 12), TokenizedChat([1] * 10, [True] * 10)], 8)


def test_pack_order_is_seeded():
    chats = random_chats(40)
    first, again = pack_conversations(chats, 63, seed=1), pack_conversations(chats, 63, seed=1)
    assert first.placement == again.placement and (first.inputs == again.inputs).all()
    assert pack_conversations(chats, 63, seed=2).placement != first.placement
    unshuffled = pack_conversations(chats, 63, shuffle=False)
    assert sorted(unshuffled.placement) == sorted(first.placement)


# --- batches ----------------------------------------------------------------------------------------------------


def test_batches_are_deterministic_per_seed_and_epoch_and_resumable():
    packed = pack_conversations(random_chats(200), 31)
    batch_size = 4
    count = batches_per_epoch(packed, batch_size)
    assert count == len(packed) // batch_size

    def rows_of(seed, epoch, start=0):
        return [batch["inputs"][:, 0].tolist() + batch["positions"][:, 0].tolist()
                for batch in batches(packed, batch_size, seed=seed, epoch=epoch, start=start)]

    epoch0 = rows_of(0, 0)
    assert len(epoch0) == count and epoch0 == rows_of(0, 0)
    assert epoch0 != rows_of(0, 1) and epoch0 != rows_of(1, 0)
    assert rows_of(0, 0, start=5) == epoch0[5:]
    batch = next(batches(packed, batch_size, seed=0, epoch=0))
    assert set(batch) == {"inputs", "targets", "positions", "segment_ids", "loss_mask"}
    assert batch["inputs"].shape == (batch_size, 31) and batch["loss_mask"].dtype == np.float32
    # every row appears at most once per epoch; only the last partial batch is left out
    seen = np.concatenate([b["inputs"] for b in batches(packed, batch_size, seed=0, epoch=0)])
    assert len(np.unique(seen, axis=0)) == len(seen) == count * batch_size
    with pytest.raises(ChatDataError, match="make no batch"):
        next(batches(packed, len(packed) + 1, seed=0, epoch=0))
