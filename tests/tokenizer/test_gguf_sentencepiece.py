"""GGUF files whose tokenizer is SentencePiece (tokenizer.ggml.model "llama": LLaMA 1 / 2, Mistral, TinyLlama).

A SentencePiece BPE model is trained here on standard-library source with LLaMA's tokenizer.model settings (<unk>,
<s>, </s> at ids 0, 1, 2; identity normalization, a dummy prefix, whitespace kept, byte fallback), its pieces are
written as GGUF metadata and as a real .gguf file, and `tokenizer_from_gguf` must give SentencePiece's own ids and
transformers' GGUF loader's ids, with llama.cpp's BOS / EOS rule in `encode_prompt`."""

import copy
import os
import pickle
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizer_texts import HARD_TEXTS

from llmjax.tokenizer import TokenizerError, load_tokenizer
from llmjax.tokenizer import sentencepiece as spm
from llmjax.tokenizer.base import SpecialIds
from llmjax.tokenizer.gguf import TokenType, tokenizer_from_gguf
from llmjax.tokenizer.sentencepiece import (
    SentencePieceTokenizer,
    read_piece_types,
    train_sentencepiece,
)

VOCAB_SIZE = 1000
CORPUS_CHARACTERS = 300_000
UNK, BOS, EOS = 0, 1, 2
TEXTS = [
    *HARD_TEXTS,
    " ",
    "  x  ",
    "a\t\tb\t",
    "\n\nstarts with newlines",
    "def f(x):\n\treturn {'a': [1, 2]}  # done\n",
    "café naïve Ünïcödé Ωμέγα",
    "CJK 漢字 and a rare emoji 🦜 need byte pieces",
    "hi</s>",
    "</s>hello<s> x",
]
# Ours and transformers' SentencePiece piece types, by name (both use llama.cpp's = SentencePiece's numbers).
GGUF_TOKEN_TYPES = {spm.NORMAL: TokenType.NORMAL, spm.UNKNOWN: TokenType.UNKNOWN, spm.CONTROL: TokenType.CONTROL,
                    spm.USER_DEFINED: TokenType.USER_DEFINED, spm.UNUSED: TokenType.UNUSED, spm.BYTE: TokenType.BYTE}


def stdlib_corpus() -> list[str]:
    """About CORPUS_CHARACTERS of the standard library's own source, in a fixed order."""
    texts, size = [], 0
    for path in sorted(Path(os.path.dirname(os.__file__)).glob("*.py")):
        if size >= CORPUS_CHARACTERS:
            break
        texts.append(path.read_text(errors="replace"))
        size += len(texts[-1])
    return texts


@pytest.fixture(scope="module")
def trained() -> SentencePieceTokenizer:
    """A SentencePiece BPE model with LLaMA's settings: <unk> <s> </s> at 0 1 2, a dummy prefix, bytes."""
    return train_sentencepiece(stdlib_corpus(), VOCAB_SIZE, special_tokens=(), add_dummy_prefix=True,
                               unk_id=UNK, bos_id=BOS, eos_id=EOS, num_threads=2)


def gguf_metadata(model: SentencePieceTokenizer) -> dict:
    """The tokenizer.ggml.* keys llama.cpp's converter writes for a SentencePiece model (add_bos_token left out:
    llama.cpp's default for "llama" is true)."""
    processor = model.processor
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [processor.id_to_piece(i) for i in range(model.vocab_size)],
        "tokenizer.ggml.scores": [processor.get_score(i) for i in range(model.vocab_size)],
        "tokenizer.ggml.token_type": [int(GGUF_TOKEN_TYPES[kind]) for kind in read_piece_types(model.model_proto)],
        "tokenizer.ggml.bos_token_id": processor.bos_id(),
        "tokenizer.ggml.eos_token_id": processor.eos_id(),
        "tokenizer.ggml.unknown_token_id": processor.unk_id(),
    }


@pytest.fixture(scope="module")
def metadata(trained) -> dict:
    return gguf_metadata(trained)


@pytest.fixture(scope="module")
def ours(metadata):
    return tokenizer_from_gguf(metadata)


def write_tokenizer_gguf(path: Path, metadata: dict) -> Path:
    """A .gguf file of a one-layer LLaMA's hyper-parameters, the tokenizer and only the embedding as tensor
    (what transformers' tokenizer loader and llmjax's config reader look at)."""
    d_model, vocab = 8, len(metadata["tokenizer.ggml.tokens"])
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(d_model)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10_000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model(metadata["tokenizer.ggml.model"])
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_scores(metadata["tokenizer.ggml.scores"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    writer.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(metadata["tokenizer.ggml.unknown_token_id"])
    writer.add_tensor("token_embd.weight", np.zeros((vocab, d_model), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_path(metadata, tmp_path_factory) -> Path:
    return write_tokenizer_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", metadata)


@pytest.fixture(scope="module")
def transformers_tokenizer(gguf_path):
    """transformers' GGUF tokenizer, told to add BOS: its loader (5.17) ignores tokenizer.ggml.add_bos_token and
    adds nothing by default, unlike llama.cpp and LLaMA's own tokenizer. (It also names <s> as the EOS token, so
    EOS is checked against llama.cpp's rule only, in the encode_prompt tests.)"""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, add_bos_token=True)


def with_changes(metadata: dict, **changes) -> dict:
    """A copy of the metadata with tokenizer.ggml.<key> set to each value (None: removed)."""
    changed = copy.deepcopy(metadata)
    for key, value in changes.items():
        changed[f"tokenizer.ggml.{key}"] = value
    return {key: value for key, value in changed.items() if value is not None}


# --- the same ids as SentencePiece and as transformers -----------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_sentencepiece_and_decode_round_trips(ours, trained, text):
    ids = ours.encode_ordinary(text)
    assert ids == trained.processor.encode(text)
    assert ours.decode(ids) == text
    if not any(special in text for special in ours.special_tokens):  # else: see the control-token test
        assert ours.decode(ours.encode(text)) == text


def test_the_vocabulary_and_its_special_tokens_are_the_files(ours, trained):
    assert ours.vocab_size == VOCAB_SIZE
    assert ours.special_tokens == {"<s>": BOS, "</s>": EOS}
    assert ours.eot_id == EOS
    assert ours.special_ids == SpecialIds(bos=BOS, eos=EOS, unk=UNK, add_bos=True)
    assert ours.processor.is_byte(ours.processor.piece_to_id("<0x0A>"))


@pytest.mark.parametrize("text", [text for text in TEXTS if not text.startswith("<s>")])
def test_ids_equal_transformers_gguf_loader(ours, transformers_tokenizer, text):
    assert transformers_tokenizer.encode(text, add_special_tokens=False) == ours.encode(text)
    assert transformers_tokenizer.encode(text) == ours.encode_prompt(text)


def test_tokenizer_from_a_gguf_file(gguf_path, ours):
    from llmjax.io.gguf import config_from_gguf, read_metadata

    from_file = tokenizer_from_gguf(gguf_path)
    assert from_file.fingerprint() == ours.fingerprint()
    assert load_tokenizer(gguf_path).encode_prompt(TEXTS[1]) == ours.encode_prompt(TEXTS[1])
    assert config_from_gguf(read_metadata(gguf_path)).vocab_size == VOCAB_SIZE  # the model side reads it too


# --- BOS / EOS and special tokens --------------------------------------------------------------------------------


def test_encode_prompt_adds_bos_by_default_and_eos_where_the_file_says(ours, metadata):
    hello = ours.encode("Hello world")
    assert ours.encode_prompt("Hello world") == [BOS, *hello]
    assert ours.encode_prompt("") == [BOS]
    with_eos = tokenizer_from_gguf(with_changes(metadata, add_eos_token=True))
    assert with_eos.encode_prompt("Hello world") == [BOS, *hello, EOS]
    plain = tokenizer_from_gguf(with_changes(metadata, add_bos_token=False))
    assert plain.encode_prompt("Hello world") == hello


def test_a_bos_the_text_starts_with_is_not_doubled(ours):
    assert ours.encode_prompt("<s>Hello") == [BOS, *ours.encode_ordinary("Hello")]


def test_control_tokens_in_text_are_one_id_when_allowed(ours, transformers_tokenizer):
    """As in llama.cpp and transformers, each stretch of text between special tokens gets its own dummy prefix
    space, so the text after one decodes with a space in front."""
    a, b = ours.encode_ordinary("a"), ours.encode_ordinary("b")
    assert ours.encode("a</s>b") == [*a, EOS, *b]
    assert ours.encode("a</s>b", allowed_special={"<s>"}) == ours.encode_ordinary("a</s>b")
    assert EOS not in ours.encode("a</s>b", allowed_special="none")
    assert ours.decode([*a, EOS, *b]) == transformers_tokenizer.decode([*a, EOS, *b]) == "a</s> b"


def test_add_space_prefix_false_puts_no_space_in_front(ours, metadata):
    no_prefix = tokenizer_from_gguf(with_changes(metadata, add_space_prefix=False))
    assert no_prefix.encode(" x = 1") == ours.encode("x = 1")
    assert no_prefix.decode(no_prefix.encode("x = 1")) == "x = 1"


def test_special_ids_survive_json_save_and_pickle(ours, metadata, tmp_path):
    with_eos = tokenizer_from_gguf(with_changes(metadata, add_eos_token=True))
    again = SentencePieceTokenizer.from_json(with_eos.to_json())
    assert again.special_ids == with_eos.special_ids == SpecialIds(bos=BOS, eos=EOS, unk=UNK, add_bos=True,
                                                                   add_eos=True)
    with_eos.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.encode_prompt("hi") == with_eos.encode_prompt("hi") == [BOS, *ours.encode("hi"), EOS]
    assert loaded.fingerprint() == with_eos.fingerprint() != ours.fingerprint()
    assert pickle.loads(pickle.dumps(with_eos)).special_ids == with_eos.special_ids


# --- files we must refuse ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"scores": None}, (r"^the GGUF file has no tokenizer.ggml.scores list \(a SentencePiece BPE vocabulary merges "
                        r"by score\)$")),
    ({"scores": [0.0, -1.0, -2.0]}, rf"^the GGUF file has 3 tokenizer.ggml.scores entries for {VOCAB_SIZE} tokens$"),
    ({"token_type": [2, 3]}, rf"^the GGUF file has 2 tokenizer.ggml.token_type entries for {VOCAB_SIZE} tokens$"),
    ({"token_type": None}, r"^the GGUF file's tokenizer.ggml.token_type marks no token as unknown \(type 2\)"),
    ({"bos_token_id": 5000}, rf"^the bos token id 5000 is not in this vocabulary of {VOCAB_SIZE} ids$"),
])
def test_bad_sentencepiece_files_get_one_clear_error(metadata, changes, message):
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_gguf(with_changes(metadata, **changes))


def test_unknown_token_types_and_duplicate_pieces_are_refused_by_index(metadata):
    types = [*metadata["tokenizer.ggml.token_type"]]
    types[7] = 0
    with pytest.raises(TokenizerError, match=r"^tokenizer.ggml.token_type\[7\] is 0, not one of llama.cpp's token "
                                             r"types: 1 \(normal\), 2 \(unknown\)"):
        tokenizer_from_gguf(with_changes(metadata, token_type=types))
    tokens = [*metadata["tokenizer.ggml.tokens"]]
    tokens[-1] = tokens[-2]
    with pytest.raises(TokenizerError, match=rf"^tokenizer.ggml.tokens {VOCAB_SIZE - 2} and {VOCAB_SIZE - 1} are "
                                             r"both "):
        tokenizer_from_gguf(with_changes(metadata, tokens=tokens))
