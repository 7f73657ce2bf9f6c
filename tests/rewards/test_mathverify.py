"""Math answers (rewards/mathverify.py): extraction, verification, its timeout off the main thread, and
the verifier pool.
"""

from __future__ import annotations

import threading

import pytest

from winnow.rewards.mathverify import (
    MathVerifier,
    VerifyTimeout,
    answer_text,
    call_with_timeout,
    last_boxed,
    verify_answer,
)


def test_answer_extraction():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\sqrt{\\frac{a}{b}}} end") == "\\sqrt{\\frac{a}{b}}"
    assert last_boxed("\\boxed{cut off") is None
    assert answer_text("<think>x = 3</think><answer>4</answer>") == "4"


@pytest.mark.parametrize(
    "text,reference,expected",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("first \\boxed{3}, no wait: \\boxed{4}", "4", 1.0),
        ("first \\boxed{3}, no wait: \\boxed{4}", "3", 0.0),
        ("<think>hmm</think><answer>42</answer>", "#### 42", 1.0),
        ("Adding them we get 18", "Janet makes 9 * 2 = 18 dollars.\n#### 18", 1.0),
        ("The final answer is 17", "We get \\boxed{18}.", 0.0),
        ("I do not know", "7", 0.0),
        ("\\boxed{7}", "no number here at all", None),
        ("\\boxed{7}", None, None),
    ],
)
def test_verify_answer(text, reference, expected):
    value, _ = verify_answer(text, reference)
    assert value == expected


def test_timeout_works_off_the_main_thread():
    def spin():
        while True:
            pass

    caught = []

    def worker():
        try:
            call_with_timeout(spin, 0.2)
        except VerifyTimeout:
            caught.append("thread")

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert caught == ["thread"]
    with pytest.raises(VerifyTimeout):
        call_with_timeout(spin, 0.2)  # main thread: the SIGALRM path
    assert call_with_timeout(lambda: 3, 0.2) == 3


def test_verifier_pool_matches_in_process():
    pairs = [("\\boxed{2}", "2"), ("\\boxed{3}", "2"), ("x", "abc"), ("\\boxed{\\frac{2}{4}}", "1/2")]
    in_process = MathVerifier(workers=0).verify_blocking(pairs)
    pool = MathVerifier(workers=1)
    try:
        assert pool.verify_blocking(pairs) == in_process
    finally:
        pool.close()
    assert [v for v, _ in in_process] == [1.0, 0.0, None, 1.0]
