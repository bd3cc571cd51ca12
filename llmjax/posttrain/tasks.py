"""Verifiable tasks: problems whose answers a program can check, for post-training a chat model.

    task = TASKS["arithmetic"]                       # or ArithmeticTask(digits=(3, 4)), SortTask(), ...
    train = problems(task, "train", count=1000, seed=0)
    messages = prompt_messages(train[0], task)       # [{"role": "user", "content": question + instruction}]
    reward = score(combined_reward, completion, train[0], task)

What they are for:
- GRPO (RL with verifiable rewards, as in DeepSeekMath and Stanford CS336 assignment 5): sample completions of
  `prompt_messages`, reward each with `correctness_reward` / `combined_reward` through `score`.
- SFT: `sft_conversations` pairs each prompt with `reference_reply`, to teach the answer format first.
- DPO: sample several completions per prompt; one that `correctness_reward` scores 1 and one it scores 0 make a
  (chosen, rejected) pair.

Answer format: the reply ends with a line "Answer: <value>"; `extract_answer` takes the text after the LAST
"Answer:" (any case) on its line. Each task's `check` compares values, not strings: integers as integers ("-12",
"- 12", "-12." agree; "12" and "120" do not), lists element by element ("1, 2, 3", "[1,2,3]" and "1 2 3" agree).

Splits: a question belongs to the test split when a stable hash (SHA-256) of its text falls in the lowest
`TEST_PERCENT` percent, otherwise to train; so train and test never share a question, for every seed and count.
`problems` draws from a seeded generator until it has `count` distinct questions of the wanted split: the result
depends only on (task, split, count, seed), and a smaller count gives a prefix of a larger one.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

TEST_PERCENT = 10
ANSWER_FORMAT = 'End your reply with a last line of the form "Answer: <value>".'
FORMAT_WEIGHT = 0.1


@dataclass(frozen=True)
class Problem:
    """One question and its answer as canonical text (what `reference_reply` writes after "Answer:")."""

    question: str
    answer: str


# ---------------------------------------------------------------------------------------------------------------
# Parsing answers


_ANSWER_MARK = re.compile(r"answer\s*:", re.IGNORECASE)
_INTEGER = re.compile(r"[+-]?\d+")
_INTEGER_WITH_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+")


def extract_answer(text: str) -> str | None:
    """The value after the last "Answer:" (any case) in `text`: the rest of that line (or the next non-empty line
    when that rest is empty), stripped of spaces and markdown emphasis; None when there is no "Answer:"."""
    matches = list(_ANSWER_MARK.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    lines = rest.split("\n")
    value = lines[0].strip(" \t\r*`")
    if not value:
        value = next((line.strip(" \t\r*`") for line in lines[1:] if line.strip(" \t\r*`")), "")
    return value


def _normalize(text: str) -> str:
    """Strips spaces, markdown emphasis, surrounding quotes and one trailing period (or !)."""
    text = text.strip().strip("*`").strip()
    if text[-1:] in (".", "!"):
        text = text[:-1].rstrip()
    text = text.strip("\"'").strip()
    return text.replace("\u2212", "-")  # the Unicode minus sign


def parse_integer(text: str | None) -> int | None:
    """The integer `text` writes ("-12", "- 12", "+7", "12.", "1,234"), or None when it writes something else."""
    if text is None:
        return None
    text = _normalize(text)
    compact = re.sub(r"(?<=[+-])\s+", "", text)  # "- 12" -> "-12"
    if _INTEGER_WITH_THOUSANDS.fullmatch(compact):
        compact = compact.replace(",", "")
    return int(compact) if _INTEGER.fullmatch(compact) else None


def parse_list(text: str | None) -> list[str] | None:
    """The items of a written list: "1, 2, 3", "[1,2,3]", "(a, b)" or "1 2 3" -> ["1", "2", "3"]; items stripped
    of spaces and quotes. None for an empty text or an empty item ("1,,2")."""
    if text is None:
        return None
    text = _normalize(text)
    if text[:1] + text[-1:] in ("[]", "()", "{}"):
        text = text[1:-1].strip()
    if "," in text:
        items = text.split(",")
        if items[-1].strip() == "":  # a trailing comma
            items.pop()
    else:
        items = text.split()
    items = [item.strip().strip("'\"").strip() for item in items]
    if not items or any(item == "" for item in items):
        return None
    return items


def _write_list(items) -> str:
    return ", ".join(str(item) for item in items)


# ---------------------------------------------------------------------------------------------------------------
# Tasks


class Task:
    """A family of verifiable problems. Subclasses are frozen dataclasses whose fields set the difficulty, with:
    `name`, `instruction` (what the user message asks beyond the question), `make(rng)` (one random problem) and
    `check(answer_text, problem)` (is the extracted answer text right)."""

    name: str = ""
    instruction: str = ""

    def make(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def check(self, answer_text: str | None, problem: Problem) -> bool:
        raise NotImplementedError


def _check_range(owner: str, field_name: str, bounds: tuple[int, int], lowest: int) -> None:
    low, high = bounds
    if not (isinstance(low, int) and isinstance(high, int) and lowest <= low <= high):
        raise ValueError(f"{owner}: {field_name}={bounds!r} must be (low, high) integers with {lowest} <= low <= high")


@dataclass(frozen=True)
class ArithmeticTask(Task):
    """`a op b` for two operands of `digits` (low, high) decimal digits each and op one of `operations` (+, -, *);
    subtraction may give a negative result. The default (1-2 digits) leaves SmolLM2-135M-Instruct some right answers
    before training (read leniently, as the last number it writes); with 2-3 digits it gets almost none, which leaves
    GRPO's groups without a reward to compare."""

    digits: tuple[int, int] = (1, 2)
    operations: tuple[str, ...] = ("+", "-", "*")
    name = "arithmetic"
    instruction = "Compute the value exactly; the answer is one integer."

    def __post_init__(self):
        _check_range("ArithmeticTask", "digits", self.digits, lowest=1)
        unknown = [op for op in self.operations if op not in ("+", "-", "*")]
        if not self.operations or unknown:
            raise ValueError(f"ArithmeticTask: operations={self.operations!r}; choose among '+', '-', '*'")

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(*self.digits)
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)

    def make(self, rng: random.Random) -> Problem:
        left, right = self._operand(rng), self._operand(rng)
        operation = rng.choice(self.operations)
        value = {"+": left + right, "-": left - right, "*": left * right}[operation]
        return Problem(question=f"What is {left} {operation} {right}?", answer=str(value))

    def check(self, answer_text: str | None, problem: Problem) -> bool:
        value = parse_integer(answer_text)
        return value is not None and value == int(problem.answer)


@dataclass(frozen=True)
class SortTask(Task):
    """Sort `length` (low, high) integers drawn from `values` (low, high) in ascending order."""

    length: tuple[int, int] = (4, 8)
    values: tuple[int, int] = (0, 99)
    name = "sort"
    instruction = "Sort the numbers in ascending order; the answer is the sorted list, separated by commas."

    def __post_init__(self):
        _check_range("SortTask", "length", self.length, lowest=1)
        _check_range("SortTask", "values", self.values, lowest=-(10**9))

    def make(self, rng: random.Random) -> Problem:
        numbers_ = [rng.randint(*self.values) for _ in range(rng.randint(*self.length))]
        return Problem(question=f"Sort these numbers: {_write_list(numbers_)}.", answer=_write_list(sorted(numbers_)))

    def check(self, answer_text: str | None, problem: Problem) -> bool:
        return _same_items(answer_text, problem.answer)


WORDS = (
    "apple", "river", "stone", "cloud", "green", "house", "table", "music", "light", "paper", "water", "tiger",
    "bread", "chair", "dream", "earth", "flame", "glass", "honey", "juice", "knife", "lemon", "mouse", "night",
    "ocean", "piano", "queen", "radio", "smile", "train", "uncle", "voice", "whale", "youth", "zebra", "bird",
    "cat", "dog", "fish", "moon", "star", "sun", "tree", "book", "door", "road", "ship", "snow", "wind", "rock",
)  # fmt: skip


@dataclass(frozen=True)
class ReverseTask(Task):
    """Reverse a list of `length` (low, high) items: common English words (`items="words"`), integers from 0 to 99
    (`items="integers"`) or either, chosen per problem (`items="mixed"`)."""

    length: tuple[int, int] = (4, 8)
    items: Literal["words", "integers", "mixed"] = "mixed"
    name = "reverse"
    instruction = "Write the items in reverse order; the answer is the reversed list, separated by commas."

    def __post_init__(self):
        _check_range("ReverseTask", "length", self.length, lowest=1)
        if self.items not in ("words", "integers", "mixed"):
            raise ValueError(f"ReverseTask: items={self.items!r}; choose 'words', 'integers' or 'mixed'")

    def make(self, rng: random.Random) -> Problem:
        kind = rng.choice(("words", "integers")) if self.items == "mixed" else self.items
        count = rng.randint(*self.length)
        items = [rng.choice(WORDS) for _ in range(count)] if kind == "words" else [
            rng.randint(0, 99) for _ in range(count)
        ]
        return Problem(question=f"Reverse this list: {_write_list(items)}.", answer=_write_list(reversed(items)))

    def check(self, answer_text: str | None, problem: Problem) -> bool:
        return _same_items(answer_text, problem.answer)


def _same_items(answer_text: str | None, expected: str) -> bool:
    """Element-wise equality of two written lists: integers as integers, words case-insensitively."""
    got, want = parse_list(answer_text), parse_list(expected)
    if got is None or want is None or len(got) != len(want):
        return False
    for got_item, want_item in zip(got, want):
        want_integer = parse_integer(want_item)
        if want_integer is not None:
            if parse_integer(got_item) != want_integer:
                return False
        elif got_item.lower() != want_item.lower():
            return False
    return True


@dataclass(frozen=True)
class AlgebraTask(Task):
    """Solve a*x + b = c for the integer x: |a| from 2 to `max_coefficient` (either sign), |b| up to `max_offset`,
    |x| up to `max_solution`. The answer may be written "x = 4"."""

    max_coefficient: int = 9
    max_offset: int = 20
    max_solution: int = 10
    name = "algebra"
    instruction = "Solve for x; the answer is the integer value of x."

    def __post_init__(self):
        for field_name, lowest in (("max_coefficient", 2), ("max_offset", 0), ("max_solution", 0)):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < lowest:
                raise ValueError(f"AlgebraTask: {field_name}={value!r} must be an integer >= {lowest}")

    def make(self, rng: random.Random) -> Problem:
        coefficient = rng.randint(2, self.max_coefficient) * rng.choice((1, -1))
        offset = rng.randint(-self.max_offset, self.max_offset)
        solution = rng.randint(-self.max_solution, self.max_solution)
        right = coefficient * solution + offset
        left = f"{coefficient}x" + (f" + {offset}" if offset > 0 else f" - {-offset}" if offset < 0 else "")
        return Problem(question=f"Solve for x: {left} = {right}", answer=str(solution))

    def check(self, answer_text: str | None, problem: Problem) -> bool:
        if answer_text is not None:
            answer_text = re.sub(r"^\s*x\s*=\s*", "", answer_text, flags=re.IGNORECASE)
        value = parse_integer(answer_text)
        return value is not None and value == int(problem.answer)


TASKS: dict[str, Task] = {task.name: task for task in (ArithmeticTask(), SortTask(), ReverseTask(), AlgebraTask())}


# ---------------------------------------------------------------------------------------------------------------
# Prompts and replies


def prompt_messages(problem: Problem, task: Task) -> list[dict]:
    """The conversation that asks `problem`: one user message with the question, the task's instruction and the
    answer format."""
    return [{"role": "user", "content": f"{problem.question}\n{task.instruction}\n{ANSWER_FORMAT}"}]


def reference_reply(problem: Problem) -> str:
    """A short correct assistant reply, in the answer format (the SFT target)."""
    return f"Answer: {problem.answer}"


# ---------------------------------------------------------------------------------------------------------------
# Rewards: every reward function takes (completion, problem, task) and returns a float


_FORMAT_LINE = re.compile(r"^[ \t*]*answer[ \t*]*:[ \t*`]*\S", re.IGNORECASE | re.MULTILINE)


def correctness_reward(completion: str, problem: Problem, task: Task) -> float:
    """1.0 when the completion's extracted answer checks against the problem, else 0.0."""
    return 1.0 if task.check(extract_answer(completion), problem) else 0.0


def format_reward(completion: str, problem: Problem | None = None, task: Task | None = None) -> float:
    """1.0 when some line of the completion starts with "Answer:" followed by a value, else 0.0 (right or wrong)."""
    return 1.0 if _FORMAT_LINE.search(completion) else 0.0


def combined_reward(
    completion: str, problem: Problem, task: Task, format_weight: float = FORMAT_WEIGHT
) -> float:
    """correctness (0 or 1) + format_weight * format (0 or 1): a small bonus for the answer format, so that early
    in RL, before any answer is right, a group of samples still has rewards to tell apart."""
    return correctness_reward(completion, problem, task) + format_weight * format_reward(completion)


class RewardError(ValueError):
    """A reward function that raised, or returned something other than a finite real number."""


RewardFn = Callable[[str, Problem, Task], float]


def _function_name(function) -> str:
    return getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or repr(function)


def score(reward_fn: RewardFn, completion: str, problem: Problem, task: Task) -> float:
    """reward_fn(completion, problem, task) as a float; a raise, or a return that is not a finite int or float
    (a string, None, NaN, infinity, a bool), becomes one RewardError naming the function and the question."""
    name = _function_name(reward_fn)
    try:
        value = reward_fn(completion, problem, task)
    except Exception as error:
        raise RewardError(
            f"reward function {name} raised {type(error).__name__}: {error} on the problem {problem.question!r}"
        ) from error
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RewardError(
            f"reward function {name} returned {value!r} ({type(value).__name__}) on the problem "
            f"{problem.question!r}; a reward must be a finite int or float (not a bool, string or None)"
        )
    return float(value)


# ---------------------------------------------------------------------------------------------------------------
# Splits


def is_test_question(question: str) -> bool:
    """Whether `question` belongs to the test split: its SHA-256 falls in the lowest TEST_PERCENT percent."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT


def problems(task: Task, split: Literal["train", "test"], count: int, seed: int = 0) -> list[Problem]:
    """`count` distinct problems of `split`, drawn from a generator seeded by (task name, split, seed); the same
    arguments give the same list, and a smaller count a prefix of it. ValueError when `count` distinct questions of
    the split are not found within a generous number of draws (a problem space too small for the count)."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; use 'train' or 'test'")
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count={count!r} must be a non-negative integer")
    want_test = split == "test"
    rng = random.Random(f"{task.name}/{split}/{seed}")
    found: dict[str, Problem] = {}
    max_draws = 200 * count + 2000
    for _ in range(max_draws):
        if len(found) == count:
            break
        problem = task.make(rng)
        if problem.question not in found and is_test_question(problem.question) == want_test:
            found[problem.question] = problem
    if len(found) < count:
        raise ValueError(
            f"{task!r}: found only {len(found)} distinct {split} problems of the {count} asked for after {max_draws} "
            f"draws; the task's problem space is too small for this count: ask for fewer or raise its difficulty"
        )
    return list(found.values())


def sft_conversations(task: Task, count: int, seed: int = 0) -> list[list[dict]]:
    """`count` training conversations from the train split: the prompt, then the reference reply."""
    return [
        prompt_messages(problem, task) + [{"role": "assistant", "content": reference_reply(problem)}]
        for problem in problems(task, "train", count, seed)
    ]
