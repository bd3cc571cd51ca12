"""Verifiable tasks: problems, splits, answer extraction and checking, rewards and score()'s errors."""

import functools
import random
import re

import pytest

from llmjax.posttrain.tasks import (
    TASKS,
    AlgebraTask,
    ArithmeticTask,
    Problem,
    ReverseTask,
    RewardError,
    SortTask,
    combined_reward,
    correctness_reward,
    extract_answer,
    format_reward,
    is_test_question,
    problems,
    prompt_messages,
    reference_reply,
    score,
    sft_conversations,
)

TASK_NAMES = sorted(TASKS)


def test_registry_names_every_task():
    assert TASK_NAMES == ["algebra", "arithmetic", "reverse", "sort"]
    assert all(TASKS[name].name == name for name in TASK_NAMES)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_problems_are_deterministic_distinct_and_split_disjoint(name):
    task = TASKS[name]
    train = problems(task, "train", 300, seed=0)
    test = problems(task, "test", 60, seed=0)
    assert train == problems(task, "train", 300, seed=0)
    assert problems(task, "train", 100, seed=0) == train[:100]  # a smaller count is a prefix
    assert problems(task, "train", 300, seed=1) != train
    assert len({p.question for p in train}) == 300 and len({p.question for p in test}) == 60
    assert not {p.question for p in train} & {p.question for p in test}
    assert not any(is_test_question(p.question) for p in train)
    assert all(is_test_question(p.question) for p in test)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_reference_reply_is_right_and_a_wrong_answer_is_not(name):
    task = TASKS[name]
    for problem in problems(task, "train", 100) + problems(task, "test", 20):
        reply = reference_reply(problem)
        assert reply.endswith(f"Answer: {problem.answer}")
        assert task.check(extract_answer(reply), problem)
        assert correctness_reward(reply, problem, task) == 1.0
        assert combined_reward(reply, problem, task) == pytest.approx(1.1)
        assert correctness_reward(f"Answer: {_wrong(problem.answer)}", problem, task) == 0.0
        assert correctness_reward("I do not know.", problem, task) == 0.0
        assert combined_reward("I do not know.", problem, task) == 0.0


def _wrong(answer: str) -> str:
    """A wrong answer of the same shape: the last number changed, or the first two items swapped."""
    items = answer.split(", ")
    if len(items) == 1:
        return str(int(answer) + 1)
    if len(set(items)) == 1:
        return ", ".join(items[:-1])
    first_differing = next(i for i in range(1, len(items)) if items[i] != items[0])
    items[0], items[first_differing] = items[first_differing], items[0]
    return ", ".join(items)


def test_arithmetic_answers_match_python():
    task = TASKS["arithmetic"]
    seen = set()
    for problem in problems(task, "train", 300):
        expression = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", problem.question)
        assert expression, problem.question
        left, operation, right = expression.groups()
        low, high = task.digits
        assert low <= len(left) <= high and low <= len(right) <= high
        assert int(problem.answer) == eval(f"{left} {operation} {right}")
        seen.add(operation)
        seen.add("negative" if int(problem.answer) < 0 else "positive")
    assert seen == {"+", "-", "*", "negative", "positive"}


def test_arithmetic_difficulty_is_a_constructor_argument():
    task = ArithmeticTask(digits=(4, 4), operations=("*",))
    for problem in problems(task, "train", 20):
        left, right = re.fullmatch(r"What is (\d{4}) \* (\d{4})\?", problem.question).groups()
        assert int(problem.answer) == int(left) * int(right)
    with pytest.raises(ValueError, match="operations"):
        ArithmeticTask(operations=("/",))
    with pytest.raises(ValueError, match="digits"):
        ArithmeticTask(digits=(3, 2))


def _question_list(question: str, prefix: str) -> list[str]:
    assert question.startswith(prefix) and question.endswith(".")
    return question[len(prefix):-1].split(", ")


def test_sort_answers_match_sorted():
    for problem in problems(TASKS["sort"], "train", 200):
        values = [int(item) for item in _question_list(problem.question, "Sort these numbers: ")]
        assert 4 <= len(values) <= 8
        assert [int(item) for item in problem.answer.split(", ")] == sorted(values)


def test_reverse_answers_match_reversed():
    kinds = set()
    for problem in problems(TASKS["reverse"], "train", 200):
        items = _question_list(problem.question, "Reverse this list: ")
        assert 4 <= len(items) <= 8
        assert problem.answer.split(", ") == list(reversed(items))
        kinds.add(items[0].isdigit())
    assert kinds == {True, False}  # "mixed": words and integers
    problem = problems(ReverseTask(items="words"), "train", 1)[0]
    assert not any(item.isdigit() for item in problem.answer.split(", "))


def test_algebra_solution_satisfies_the_equation():
    for problem in problems(TASKS["algebra"], "train", 200):
        parsed = re.fullmatch(r"Solve for x: (-?\d+)x(?: ([-+]) (\d+))? = (-?\d+)", problem.question)
        assert parsed, problem.question
        coefficient, sign, offset, right = parsed.groups()
        offset = 0 if offset is None else int(offset) * (1 if sign == "+" else -1)
        x = int(problem.answer)
        assert int(coefficient) * x + offset == int(right)
        assert abs(int(coefficient)) >= 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The sum is 42.", None),
        ("", None),
        ("Answer: 42", "42"),
        ("Answer: 1\nthinking again...\nAnswer: 2", "2"),
        ("answer: 7", "7"),
        ("ANSWER:   -15   ", "-15"),
        ("Answer: 12.", "12."),
        ("Answer: 12\nThat was easy.\nBye", "12"),
        ("So the final answer: [1, 2, 3]", "[1, 2, 3]"),
        ("**Answer:** 5", "5"),
        ("Answer:\n\n  9\nmore", "9"),
        ("Answer:", ""),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "answer_text, right",
    [
        ("-12", True),
        ("- 12", True),
        ("-12.", True),
        (" -12 ", True),
        ("\u221212", True),
        ("12", False),
        ("-120", False),
        ("-1", False),
        ("-12.5", False),
        ("twelve", False),
        ("", False),
        (None, False),
    ],
)
def test_integer_check(answer_text, right):
    assert TASKS["arithmetic"].check(answer_text, Problem("What is 10 - 22?", "-12")) is right


def test_integer_check_accepts_thousands_separators_only_where_they_are():
    problem = Problem("What is 617 * 2?", "1234")
    assert TASKS["arithmetic"].check("1,234", problem)
    assert not TASKS["arithmetic"].check("1,23,4", problem)
    assert not TASKS["arithmetic"].check("123", Problem("q", "1230"))
    assert not TASKS["arithmetic"].check("120", Problem("q", "12"))


@pytest.mark.parametrize(
    "answer_text, right",
    [
        ("-3, 1, 12, 40", True),
        ("-3,1,12,40", True),
        ("[-3, 1, 12, 40]", True),
        ("[-3,1,12,40].", True),
        ("-3 1 12 40", True),
        ("(-3, 1, 12, 40)", True),
        ("-3, 1, 12, 40,", True),
        ("-3, 1, 12", False),
        ("-3, 1, 12, 40, 40", False),
        ("1, -3, 12, 40", False),
        ("-3, 1, 12, 4", False),
        ("-3, 1, 120, 40", False),
        ("-3,, 1, 12, 40", False),
        ("[]", False),
    ],
)
def test_list_check(answer_text, right):
    assert TASKS["sort"].check(answer_text, Problem("Sort these numbers: 12, -3, 40, 1.", "-3, 1, 12, 40")) is right


def test_word_list_check():
    problem = Problem("Reverse this list: cat, dog, sun, moon.", "moon, sun, dog, cat")
    task = TASKS["reverse"]
    assert task.check("moon, sun, dog, cat", problem)
    assert task.check("[Moon, Sun, Dog, Cat].", problem)
    assert task.check("['moon', 'sun', 'dog', 'cat']", problem)
    assert task.check("moon sun dog cat", problem)
    assert not task.check("moon, sun, cat, dog", problem)
    assert not task.check("moon, sun, dog", problem)


def test_algebra_check_accepts_x_equals():
    problem = Problem("Solve for x: 3x + 5 = -7", "-4")
    assert TASKS["algebra"].check("x = -4", problem)
    assert TASKS["algebra"].check("X=-4.", problem)
    assert not TASKS["algebra"].check("x = 4", problem)
    assert correctness_reward("3x = -12, so x = -4.\nAnswer: x = -4", problem, TASKS["algebra"]) == 1.0


def test_format_reward_and_combined_reward():
    problem = Problem("What is 10 + 22?", "32")
    task = TASKS["arithmetic"]
    assert format_reward("Some work.\nAnswer: 33") == 1.0
    assert format_reward("the answer: 33 is my guess") == 0.0  # not on a line of its own
    assert format_reward("Answer:") == 0.0
    assert format_reward("32") == 0.0
    assert combined_reward("Answer: 33", problem, task) == pytest.approx(0.1)
    assert combined_reward("Answer: 32", problem, task) == pytest.approx(1.1)
    assert combined_reward("Answer: 32", problem, task, format_weight=0.0) == 1.0


def test_prompt_and_sft_conversations():
    task = TASKS["sort"]
    problem = problems(task, "train", 1)[0]
    [message] = prompt_messages(problem, task)
    assert message["role"] == "user"
    assert problem.question in message["content"] and task.instruction in message["content"]
    assert '"Answer: <value>"' in message["content"]
    conversations = sft_conversations(task, 5, seed=3)
    assert len(conversations) == 5
    for conversation, problem in zip(conversations, problems(task, "train", 5, seed=3)):
        assert conversation == prompt_messages(problem, task) + [
            {"role": "assistant", "content": reference_reply(problem)}
        ]


PROBLEM = Problem("What is 10 + 22?", "32")


def exploding_reward(completion, problem, task):
    raise KeyError("missing field")


@pytest.mark.parametrize("returned", ["1", None, float("nan"), float("inf"), True, [1.0]])
def test_score_refuses_non_numbers(returned):
    def reward_returning_junk(completion, problem, task):
        return returned

    with pytest.raises(RewardError, match="reward_returning_junk") as raised:
        score(reward_returning_junk, "Answer: 32", PROBLEM, TASKS["arithmetic"])
    assert PROBLEM.question in str(raised.value) and repr(returned) in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_score_names_a_raising_function_and_the_question():
    with pytest.raises(RewardError, match="exploding_reward") as raised:
        score(exploding_reward, "Answer: 32", PROBLEM, TASKS["arithmetic"])
    assert PROBLEM.question in str(raised.value) and "missing field" in str(raised.value)
    assert isinstance(raised.value.__cause__, KeyError)


def test_score_passes_numbers_through_as_float():
    task = TASKS["arithmetic"]
    assert score(lambda completion, problem, task: 1, "x", PROBLEM, task) == 1.0
    assert type(score(lambda completion, problem, task: 1, "x", PROBLEM, task)) is float
    assert score(lambda completion, problem, task: -0.5, "x", PROBLEM, task) == -0.5
    assert score(correctness_reward, "Answer: 32", PROBLEM, task) == 1.0
    assert score(format_reward, "no format", PROBLEM, task) == 0.0
    assert score(functools.partial(combined_reward, format_weight=0.5), "Answer: 1", PROBLEM, task) == 0.5


def test_problems_refuses_a_count_the_task_cannot_reach():
    tiny = ArithmeticTask(digits=(1, 1), operations=("+",))  # 100 questions, about 10 of them test
    with pytest.raises(ValueError, match="found only .* distinct test problems of the 50 asked for"):
        problems(tiny, "test", 50)
    assert len(problems(tiny, "train", 5)) == 5
    with pytest.raises(ValueError, match="split"):
        problems(tiny, "validation", 5)
    with pytest.raises(ValueError, match="count"):
        problems(tiny, "train", -1)
    assert problems(tiny, "train", 0) == []


def test_make_uses_only_the_given_generator():
    for task in TASKS.values():
        assert task.make(random.Random(7)) == task.make(random.Random(7))
    assert SortTask(length=(2, 2), values=(5, 5)).make(random.Random(0)) == Problem("Sort these numbers: 5, 5.", "5, 5")
    assert AlgebraTask(max_offset=0).make(random.Random(0)).question.count("=") == 1
