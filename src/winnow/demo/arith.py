"""The demo task family: multi-step integer arithmetic with checkable steps.

A problem is a left-to-right chain of 2-4 operations written as one expression, e.g.
``Compute (17 + 25) * 2 - 8.`` (every intermediate value within 0..99); its reference solution has
one step per line and a final ``\\boxed{}`` answer, so the ``math`` ORM and step-level PRMs apply
unchanged::

    17 + 25 = 42
    42 * 2 = 84
    84 - 8 = 76
    The answer is \\boxed{76}.

:func:`step_checks` re-checks every line of a sampled solution against the problem (right operands,
right operator, right arithmetic, right carried result), which gives the step-level correctness
labels the process reward model is trained on; :func:`step_labels` is their prefix AND. Nothing
here imports torch.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

STEP_SEPARATOR = "\n"
OPS = "+-*"
MAX_VALUE = 99
_STEP = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*\.?\s*$")
_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")
_BOXED_SPAN = re.compile(r"\\boxed\{\s*(-?\d+)")


@dataclass(frozen=True)
class Op:
    """One operation of a chain: the operator and its right operand."""

    sign: str
    value: int


@dataclass(frozen=True)
class Problem:
    """A chain ``start op1 op2 ...`` evaluated left to right."""

    start: int
    ops: tuple[Op, ...]

    def results(self) -> list[int]:
        """The value after each operation."""
        out, acc = [], self.start
        for op in self.ops:
            acc = apply(acc, op)
            out.append(acc)
        return out

    @property
    def answer(self) -> int:
        return self.results()[-1]

    def expression(self) -> str:
        """The chain as one expression with the parentheses left-to-right evaluation needs."""
        text, last = str(self.start), None
        for op in self.ops:
            if op.sign == "*" and last in ("+", "-"):
                text = f"({text})"
            text = f"{text} {op.sign} {op.value}"
            last = op.sign
        return text

    def question(self) -> str:
        return f"Compute {self.expression()}."

    def solution_steps(self) -> list[str]:
        """The reference solution, one step per item (the last one states the answer)."""
        steps, acc = [], self.start
        for op in self.ops:
            new = apply(acc, op)
            steps.append(f"{acc} {op.sign} {op.value} = {new}")
            acc = new
        steps.append(f"The answer is \\boxed{{{acc}}}.")
        return steps

    def solution(self) -> str:
        return STEP_SEPARATOR.join(self.solution_steps())

    def row(self, id: str) -> dict:
        """The dataset row: ``problem``/``solution``/``answer`` (the answer is the reward reference)."""
        return {"id": id, "problem": self.question(), "solution": self.solution(), "answer": str(self.answer)}


def apply(acc: int, op: Op) -> int:
    """``acc op.sign op.value``."""
    if op.sign == "+":
        return acc + op.value
    if op.sign == "-":
        return acc - op.value
    return acc * op.value


def random_problem(rng: random.Random, min_ops: int = 2, max_ops: int = 4) -> Problem:
    """A chain whose every intermediate value stays within 0..MAX_VALUE."""
    acc = rng.randint(2, 40)
    start, ops = acc, []
    for _ in range(rng.randint(min_ops, max_ops)):
        choices = (["+"] if acc <= MAX_VALUE - 2 else []) + ["-"] + (["*"] if 1 < acc <= MAX_VALUE // 2 else [])
        sign = rng.choice(choices)
        if sign == "+":
            value = rng.randint(2, min(40, MAX_VALUE - acc))
        elif sign == "-":
            value = rng.randint(1, min(40, acc)) if acc >= 1 else 0
        else:
            value = rng.randint(2, min(9, MAX_VALUE // acc))
        op = Op(sign, value)
        ops.append(op)
        acc = apply(acc, op)
    return Problem(start, tuple(ops))


def generate(n: int, seed: int, exclude: set[str] | None = None) -> list[Problem]:
    """``n`` distinct seeded problems, none of whose questions is in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Problem] = []
    while len(out) < n:
        p = random_problem(rng)
        q = p.question()
        if q not in seen:
            seen.add(q)
            out.append(p)
    return out


def make_splits(n_train: int = 20000, n_test: int = 500, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and test problems (the test split is drawn first, with its own seed)."""
    test = generate(n_test, seed=seed * 1000 + 1)
    train = generate(n_train, seed=seed * 1000 + 2, exclude={p.question() for p in test})
    return train, test


def write_split(problems: list[Problem], path: str | Path, prefix: str) -> Path:
    """Write problems as a JSONL dataset winnow loads (``problem``/``solution``/``answer``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, p in enumerate(problems):
            f.write(json.dumps(p.row(f"{prefix}-{i}")) + "\n")
    return path


# ----------------------------------------------------------------------------- checking


_EXPR_TOKEN = re.compile(r"\d+|[+\-*]")


def parse_question(question: str) -> Problem:
    """The chain a question states (the inverse of :meth:`Problem.question`)."""
    tokens = _EXPR_TOKEN.findall(question)
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        raise ValueError(f"not a demo arithmetic question: {question!r}")
    ops = tuple(Op(tokens[i], int(tokens[i + 1])) for i in range(1, len(tokens), 2))
    return Problem(int(tokens[0]), ops)


def split_steps(solution: str) -> list[str]:
    """The non-empty steps of a solution."""
    return [s for s in solution.split(STEP_SEPARATOR) if s.strip()]


def boxed_answer(text: str) -> int | None:
    """The last ``\\boxed{n}`` integer in ``text``."""
    found = _BOXED.findall(text)
    return int(found[-1]) if found else None


def is_correct(problem: Problem, solution: str) -> bool:
    """Whether the final boxed answer is the problem's answer (what the ``math`` ORM checks)."""
    return boxed_answer(solution) == problem.answer


def step_checks(problem: Problem, solution: str) -> list[bool]:
    """One verdict per step of ``solution``, each judged given the steps written before it.

    A computation step is right when it applies the problem's next operation to the result the
    previous step wrote (the problem's first number for the first step) and its arithmetic is
    right; the answer step is right when it comes after every operation and boxes the result the
    last step wrote. A step after a slip can be right in itself (PRM800K-style labels).
    """
    steps = split_steps(solution)
    out: list[bool] = []
    acc, k = problem.start, 0
    for i, step in enumerate(steps):
        m = _STEP.match(step)
        if m and k < len(problem.ops):
            left, sign, right, result = int(m[1]), m[2], int(m[3]), int(m[4])
            expected = problem.ops[k]
            out.append(
                left == acc
                and sign == expected.sign
                and right == expected.value
                and result == apply(left, Op(sign, right))
            )
            acc, k = result, k + 1
        else:
            out.append(k == len(problem.ops) and boxed_answer(step) == acc and i == len(steps) - 1)
            k = len(problem.ops) + 1  # anything after the answer step is wrong
    return out


def step_labels(problem: Problem, solution: str) -> list[bool]:
    """One label per step of ``solution``: True while every step so far is right.

    Math-Shepherd's hard estimate: once a step is wrong, no continuation reaches the right answer
    by valid steps, so every later step is labelled wrong too. The prefix AND of :func:`step_checks`.
    """
    out, ok = [], True
    for check in step_checks(problem, solution):
        ok = ok and check
        out.append(ok)
    return out


def near_miss(value: int, rng: random.Random) -> int:
    """A wrong value of the kind the demo policy writes: mostly a carry slip (off by 10), else off
    by 1 or 2, one digit changed, off by a little more, or its digits swapped (never negative)."""
    value = abs(value)
    for _ in range(20):
        k = rng.random()
        if k < 0.35:
            out = value + rng.choice((-10, 10))
        elif k < 0.65:
            out = value + rng.choice((-2, -1, 1, 2))
        elif k < 0.8:
            digits = list(str(value))
            i = rng.randrange(len(digits))
            digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
            out = int("".join(digits))
        elif k < 0.95:
            out = value + rng.choice((-1, 1)) * rng.randint(3, 20)
        else:
            out = int(str(value)[::-1])
        if out != value and out >= 0:
            return out
    return value + 1


def noisy_solution(problem: Problem, rng: random.Random, p_wrong: float = 0.5, p_miscopy: float = 0.1) -> str:
    """A solution whose every written result is, independently, right or a near miss (``p_wrong``),
    with now and then a miscopied operand or operator; later steps go on from the value written, as
    a model's would. Right and wrong results then come with the same operands equally often, so a
    verifier trained on them cannot score a step by how hard its numbers look: it has to check it."""
    steps, acc = [], problem.start
    for op in problem.ops:
        left, sign, value = acc, op.sign, op.value
        r = rng.random()
        if r < p_miscopy / 3:
            left = near_miss(acc, rng)
        elif r < 2 * p_miscopy / 3:
            value = near_miss(value, rng)
        elif r < p_miscopy:
            sign = rng.choice([s for s in OPS if s != op.sign])
        new = apply(left, Op(sign, value))
        if rng.random() < p_wrong:
            new = near_miss(new, rng)
        steps.append(f"{left} {sign} {value} = {new}")
        acc = new
    answer = acc if rng.random() >= p_wrong else near_miss(acc, rng)
    steps.append(f"The answer is \\boxed{{{answer}}}.")
    return STEP_SEPARATOR.join(steps)


def char_checks(problem: Problem, solution: str) -> list[tuple[int, bool]]:
    """Dense labels: for each character of a number or operator a step writes, its offset in
    ``solution`` and whether the step is still right up to and including it (each step judged given
    the steps before it, like :func:`step_checks`): the left operand against the result the step
    before wrote, the operator and right operand against the problem, the result's digits against
    the arithmetic of the operands written, the boxed answer against the last result.

    A verifier checks a step token by token; labels at those tokens teach it where to look, which a
    label at the end of the step alone does not (a tiny model trained on those alone learns only
    how hard the step's numbers look)."""
    out: list[tuple[int, bool]] = []
    acc, k, pos = problem.start, 0, 0
    for step in split_steps(solution):
        at = solution.index(step, pos)
        pos = at + len(step)
        m = _STEP.match(step)
        if m and k < len(problem.ops):
            expected = problem.ops[k]
            left, sign, right, result = m[1], m[2], m[3], m[4]
            truth = str(apply(int(left), Op(sign, int(right))))
            ok = True
            for group, want in ((1, str(acc)), (2, expected.sign), (3, str(expected.value)), (4, truth)):
                text = m[group]
                ok_group = ok if group != 4 else True  # the result is checked against the operands written
                for j in range(len(text)):
                    out.append((at + m.start(group) + j, ok_group and text[: j + 1] == want[: j + 1]))
                ok = ok and text == want
            acc, k = int(result), k + 1
        else:
            boxed = list(_BOXED_SPAN.finditer(step))
            if boxed:
                text, start = boxed[-1][1], at + boxed[-1].start(1)
                for j in range(len(text)):
                    out.append((start + j, k == len(problem.ops) and text[: j + 1] == str(acc)[: j + 1]))
            k = len(problem.ops) + 1
    return out
