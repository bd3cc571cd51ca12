"""llmjax.retrieval.rag_eval, issue 24's RAG evaluation: the held-out selection (a larger validation fraction holds
the smaller one's files; targets spread round-robin over the files), chunks labelled with their module in QA
prompts, the few-shot demonstrations (the same turns in both conditions but for the retrieved chunks; their
functions never in a question set), the prefilled assistant turn, and exact match on the reply's first dotted name."""

import pytest

from llmjax.data.corpus import CorpusFile, split_of
from llmjax.retrieval.rag import Chunk, RagError, Retrieved, build_prompt, chunk_block, context_content
from llmjax.retrieval.rag_eval import (DEMONSTRATED, DEMONSTRATIONS, QA_PREFILL, QUESTION, exact_match,
                                       heldout_documents, loss_targets, module_label, module_name, normalize_answer,
                                       qa_eval, qa_history, stdlib_questions)
from llmjax.tokenizer.bytes import ByteTokenizer
from llmjax.tokenizer.chat import ChatFormat

TOKENIZER = ByteTokenizer()  # one token per byte
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# --- the held-out selection ------------------------------------------------------------------------------------------

def test_a_larger_validation_fraction_holds_the_smaller_ones_files(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i:02d}.py").write_text(f"x = {i}\n")
    (tmp_path / "empty.py").write_text("  \n")
    small = {d.key for d in heldout_documents(tmp_path, 0.1)}
    large = {d.key for d in heldout_documents(tmp_path, 0.5)}
    expected = {f"m{i:02d}.py" for i in range(40) if split_of(f"m{i:02d}.py", 0.5) == "validation"}
    assert large == expected and small < large and len(small) >= 1  # blank files never held out
    assert small == {f"m{i:02d}.py" for i in range(40) if split_of(f"m{i:02d}.py", 0.1) == "validation"} or \
        len(small) == 1  # with none below the fraction, the split still holds out one file
    for bad in (0, 1, 1.5):
        with pytest.raises(RagError, match=f"--validation-fraction {bad}: expected a fraction"):
            heldout_documents(tmp_path, bad)


class Document:
    def __init__(self, key, text):
        self.key, self.text = key, text


def test_targets_spread_round_robin_over_the_long_enough_files():
    documents = [Document("a.py", "a" * 100), Document("short.py", "s" * 12), Document("b.py", "b" * 40),
                 Document("c.py", "".join(chr(65 + i % 26) for i in range(60)))]
    # context 10, target 8: starts 10, 18, ... while start + 8 <= length; short.py (12 bytes) gives none
    every = loss_targets(documents, TOKENIZER, context=10, target=8, per_file=3)
    starts = {key: [t.start for t in every if t.file == key] for key in ("a.py", "short.py", "b.py", "c.py")}
    assert starts == {"a.py": [10, 50, 90], "short.py": [], "b.py": [10, 18, 26], "c.py": [10, 26, 50]}
    capped = loss_targets(documents, TOKENIZER, context=10, target=8, per_file=3, total=5)
    # every long enough file's first target, then the second ones in file order, in document order
    assert [(t.file, t.start) for t in capped] == [("a.py", 10), ("a.py", 50), ("b.py", 10), ("b.py", 18),
                                                  ("c.py", 10)]
    text = documents[3].text
    target = capped[-1]
    assert TOKENIZER.decode(target.preceding.tolist()) == text[:10] and TOKENIZER.decode(target.target.tolist()) \
        == text[10:18]


# --- QA prompts ------------------------------------------------------------------------------------------------------

def test_module_labels():
    assert module_label(Chunk("email/utils.py:208-218", "email/utils.py", "x")) == \
        "# module email.utils (email/utils.py, lines 208-218)"
    assert module_label(Chunk("json/__init__.py:1-9", "json/__init__.py", "x")) == \
        "# module json (json/__init__.py, lines 1-9)"
    assert module_label(Chunk("notes.txt:3-4", "notes.txt", "x")) == "# source: notes.txt:3-4"
    assert module_name("xml/etree/ElementTree.py") == "xml.etree.ElementTree"


def qa_prompt(chunks, shots=2, prefill=QA_PREFILL):
    question = QUESTION.format(docstring="Return the sum of two numbers.")
    chat = ChatFormat.create(CHATML)
    return build_prompt(question, chunks, TOKENIZER, 20_000, chat, label=module_label,
                        history=qa_history(shots, bool(chunks), module_label, prefill), prefill=prefill)


def test_qa_prompts_label_the_chunks_and_prefill_the_reply():
    found = [Retrieved(Chunk("ops/arith.py:3-4", "ops/arith.py", "def add(a, b):\n    return a + b\n"), 0.9, 0)]
    with_context, without = qa_prompt(found), qa_prompt([])
    assert "# module ops.arith (ops/arith.py, lines 3-4)\ndef add(a, b):\n    return a + b\n\nQuestion: " \
        in with_context.text
    for prompt in (with_context, without):  # the reply starts after the prefill, in both conditions
        assert prompt.text.endswith("Answer with its full name only, as module.function.<|im_end|>\n"
                                    "<|im_start|>assistant\nAnswer:")
        assert prompt.text.count("<|im_start|>assistant\nAnswer: textwrap.dedent<|im_end|>") == 1
        assert prompt.text.count("<|im_start|>assistant\nAnswer: email.utils.parseaddr<|im_end|>") == 1
    assert "# module" not in without.text and "Context:" not in without.text
    # the demonstrations' context: labelled chunks, the right one second in the first, first in the second
    assert "# module textwrap (textwrap.py, lines 419-425)\ndef dedent(text):" in with_context.text
    assert with_context.text.index("# module base64") < with_context.text.index("# module textwrap") \
        < with_context.text.index("# module email.utils") < with_context.text.index("# module calendar")
    assert qa_prompt([], shots=0, prefill="").text.endswith("module.function.<|im_end|>\n<|im_start|>assistant\n")


def test_both_conditions_have_the_same_turns_but_the_chunks():
    with_turns, without_turns = qa_history(2, True), qa_history(2, False)
    assert [t["role"] for t in with_turns] == ["user", "assistant"] * 2
    for demo, user_with, user_without in zip(DEMONSTRATIONS, with_turns[0::2], without_turns[0::2]):
        context = "".join(chunk_block(c, module_label) + "\n\n" for c in demo.context)
        assert user_with["content"] == context_content(user_without["content"], context)
        assert user_without["content"] == QUESTION.format(docstring=demo.docstring)
    assert with_turns[1::2] == without_turns[1::2] == [{"role": "assistant", "content": f"Answer: {d.answer}"}
                                                       for d in DEMONSTRATIONS]
    assert qa_history(1) == without_turns[:2] and qa_history(0) == []
    with pytest.raises(RagError, match="--shots 3: expected 0 .. 2"):
        qa_history(3)


def test_each_demonstration_answers_itself_from_its_own_context():
    """The right chunk defines the answer's function under its docstring, in the answer's module."""
    for demo in DEMONSTRATIONS:
        module, function = demo.answer.rsplit(".", 1)
        right = [c for c in demo.context if f"def {function}(" in c.text]
        assert len(right) == 1 and module_name(right[0].file) == module and demo.docstring in right[0].text
        assert all(c.key.startswith(f"{c.file}:") for c in demo.context)


def test_demonstrations_are_never_questions(tmp_path):
    sources = {"textwrap.py": 'def dedent(text):\n    """Remove any common leading whitespace from every line in '
                              '`text`."""\n\ndef fill(text):\n    """Wrap a single paragraph of text for the '
                              'reader."""\n',
               "email/utils.py": 'def parseaddr(addr):\n    """\n    Parse addr into its constituent realname and '
                                 'email address parts.\n    """\n'}
    for key, text in sources.items():
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_text(text)
    files = [CorpusFile(tmp_path / key, key) for key in sources]
    assert [q["answer"] for q in stdlib_questions(10, files)] == ["textwrap.fill"]  # the others are eligible but shown
    assert DEMONSTRATED == {"textwrap.dedent", "email.utils.parseaddr"}
    question = {"question": "q", "answer": "textwrap.dedent"}
    with pytest.raises(RagError, match="question about textwrap.dedent is one of the few-shot demonstrations"):
        qa_eval(None, None, None, [question])  # refused before any model is needed
    with pytest.raises(RagError, match="question about email.utils.parseaddr"):
        qa_eval(None, None, None, [{"question": "q", "answer": "email.utils.parseaddr"}], shots=2)


# --- scoring ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, right", [
    (" textwrap.dedent", True), (" `textwrap.dedent(text)`.", True), (" The function is TextWrap.Dedent, yes", True),
    (" textwrap.dedent is like textwrap.indent", True), (" textwrap.indent, not textwrap.dedent", False),
    (" dedent", False), (" mytextwrap.dedent", False), (" textwrap.dedented", False), ("", False),
    (" Answer: textwrap.py defines dedent", False), (" see .textwrap.dedent", False)])
def test_exact_match_is_the_first_dotted_name(reply, right):
    assert exact_match(reply, "textwrap.dedent") is right


def test_first_dotted_name_with_aliases_and_undotted_answers():
    assert normalize_answer("Answer: asyncio.gather(*aws)\nmore") == "asyncio.gather"
    assert exact_match(" asyncio.gather", "asyncio.tasks.gather", ["asyncio.gather"])
    assert exact_match(" asyncio.tasks.gather", "asyncio.tasks.gather", ["asyncio.gather"])
    assert not exact_match(" asyncio.wait_for, then asyncio.gather", "asyncio.tasks.gather", ["asyncio.gather"])
    assert exact_match("`helper(x)`", "helper") and not exact_match("`helper2`", "helper")  # no dot: the first line


def test_a_plain_prompt_puts_the_history_first_and_the_prefill_last():
    """A model without a chat template: the earlier turns' texts, the chunks, then the query and the prefill."""
    found = [Retrieved(Chunk("m.py:1-1", "m.py", "x = 1\n"), 0.9, 0)]
    history = [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "Answer: a.b"}]
    prompt = build_prompt("Q2?", found, TOKENIZER, 1000, label=module_label, history=history, prefill="Answer:")
    assert prompt.text == "Q1?\n\nAnswer: a.b\n\n# module m (m.py, lines 1-1)\nx = 1\n\nQ2?Answer:"
    assert build_prompt("Q2?", found, TOKENIZER, 1000).text == "# source: m.py:1-1\nx = 1\n\nQ2?"  # the defaults
    with pytest.raises(RagError, match="query alone takes 28 tokens \\(with the prompt's frame and 2 earlier turns"):
        build_prompt("Q2?", found, TOKENIZER, 27, history=history, prefill="Answer:")


@pytest.mark.parametrize("argv, message", [
    (["qa", "--shots", "5"], "--shots 5: expected 0 .. 2 (the fixed demonstrations)"),
    (["loss", "--validation-fraction", "1.0"], "--validation-fraction 1.0: expected a fraction between 0 and 1")])
def test_bad_flags_are_one_line_before_anything_loads(tmp_path, capsys, argv, message):
    from llmjax.experiments import rag_eval

    missing = tmp_path / "no-index"  # never read: the flag is refused first
    assert rag_eval.main([*argv, "--index", str(missing), "--model", "llama-tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"python -m experiments rag_eval {argv[0]}: {message}"
