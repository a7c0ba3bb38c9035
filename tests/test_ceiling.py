"""bench/ceiling.py's arithmetic: the pass@k estimator and the self-consistency vote it reports."""

from __future__ import annotations

import importlib.util
from itertools import combinations
from pathlib import Path

import pytest

from learner.tasks import Task

_spec = importlib.util.spec_from_file_location("ceiling", Path(__file__).resolve().parent.parent / "bench" / "ceiling.py")
ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ceiling)


@pytest.mark.parametrize("n,c", [(8, 0), (8, 1), (8, 3), (8, 8), (6, 2), (16, 5)])
def test_pass_at_k_is_the_chance_that_k_of_the_n_samples_hold_a_success(n: int, c: int) -> None:
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        draws = list(combinations(outcomes, k))  # every size-k subset, equally likely
        exact = sum(any(d) for d in draws) / len(draws)
        assert ceiling.pass_at_k(n, c, k) == pytest.approx(exact)


def test_the_vote_takes_the_most_common_final_number_and_ignores_replies_without_one() -> None:
    task = Task(key="file:t1", messages=(), expected=12, check="numeric")
    assert ceiling.majority_correct(["It is 12.", "so 3", "I think 12", "no idea"], task)
    assert not ceiling.majority_correct(["3", "3", "12"], task)
    assert ceiling.majority_correct(["12", "3"], task)  # a tie goes to the number seen first
    assert not ceiling.majority_correct(["3", "12"], task)
    assert not ceiling.majority_correct(["no idea", ""], task)  # nobody answered: the vote fails
