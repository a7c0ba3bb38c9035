"""learner.checks: the answer checkers shared by the verifier labels, exploration and the gate."""

from __future__ import annotations

import pytest

from learner.checks import CHECKS, CheckError, check_answer, default_check, last_number

# ---------------------------------------------------------------- last_number


@pytest.mark.parametrize("text, want", [
    ("The answer is 42.", 42.0),
    ("first 3 then 7", 7.0),  # the LAST number
    ("It costs 1,234 dollars", 1234.0),
    ("1,234,567.25", 1234567.25),
    ("temperature: -3 degrees", -3.0),
    ("pi is about 3.14159", 3.14159),
    ("half is .5", 0.5),
    ("minus half is -.5", -0.5),
    ("three quarters: 3/4", 0.75),
    ("spaced 3 / 4", 0.75),
    ("negative -3/4", -0.75),
    ("$12", 12.0),
    ("50%", 50.0),
    ("12kg", 12.0),  # a trailing unit is ignored
    ("1, 2, 3", 3.0),  # a list: commas followed by a space are not thousands separators
    ("version 1.2.3", 1.2),  # "3" right after "." is not a number of its own
])
def test_last_number_reads(text: str, want: float) -> None:
    assert last_number(text) == want


@pytest.mark.parametrize("text", ["", "no digits here", "x2", "1/0", "abc_7"])
def test_last_number_none(text: str) -> None:
    assert last_number(text) is None


# ---------------------------------------------------------------- default_check


@pytest.mark.parametrize("expected, want", [
    (42, "numeric"),
    (3.5, "numeric"),
    ("42", "numeric"),
    (" 42 ", "numeric"),
    ("1,234", "numeric"),
    ("-7", "numeric"),
    (".5", "numeric"),
    ("3/4", "numeric"),  # last_number reads fractions, so a fraction string is a number too
    (True, "contains"),  # bool is an int subclass, but not a number here
    ("Paris", "contains"),
    ("1,2,3", "contains"),  # a list, not 123 (float("123") would have said numeric)
    ("12,34", "contains"),
    ("1e3", "contains"),  # last_number does not read exponents: it would compare against 1
    ("inf", "contains"),
    ("nan", "contains"),
    ("Infinity", "contains"),
    ("1_000", "contains"),
    ("1/0", "contains"),
    (["a"], "contains"),
])
def test_default_check(expected, want: str) -> None:
    assert default_check(expected) == want


# ---------------------------------------------------------------- numeric


@pytest.mark.parametrize("reply, expected, ok", [
    ("The answer is 42.", 42, True),
    ("The answer is 42.", "42", True),
    ("I think 41, no wait, 42", 42, True),
    ("42 at first, but the answer is 41", 42, False),  # only the last number counts
    ("Total: 1,234", 1234, True),
    ("Total: 1234", "1,234", True),
    ("Total: 1,234.0", "1,234", True),
    ("It is -17", -17, True),
    ("It is 17", -17, False),
    ("0.75", "3/4", True),
    ("3/4", 0.75, True),
    ("3/4", "0.75", True),
    ("0.33333", 1 / 3, False),  # 1e-5 relative: outside the 1e-6 tolerance
    ("0.3333333", 1 / 3, True),  # 1e-7 relative: inside
    ("1000001", 1_000_000, True),  # relative error 1e-6: on the boundary, accepted
    ("1000002", 1_000_000, False),
    ("0", 0, True),
    ("0.0000000001", 0, True),  # absolute 1e-9 around 0
    ("0.00001", 0, False),
    ("no number at all", 5, False),
    ("", 5, False),
    (None, 5, False),
])
def test_numeric(reply, expected, ok: bool) -> None:
    assert check_answer(reply, expected) is ok
    assert check_answer(reply, expected, "numeric") is ok


def test_numeric_string_expected_with_commas_uses_its_value() -> None:
    assert check_answer("1234", "1,234", "numeric") is True
    assert check_answer("234", "1,234", "numeric") is False


@pytest.mark.parametrize("expected", ["Paris", "nan", "", float("nan"), float("inf"), True, False])
def test_numeric_with_a_non_number_expected_is_a_check_error(expected) -> None:
    with pytest.raises(CheckError, match="not a number"):
        check_answer("42", expected, "numeric")


def test_default_check_of_list_like_expected_is_not_numeric() -> None:
    # Before the fix "1,2,3" was checked numerically against its last digit: "3" was a success.
    assert check_answer("3", "1,2,3") is False
    assert check_answer("the list is 1,2,3", "1,2,3") is True


def test_exponent_expected_is_compared_as_text() -> None:
    # Before the fix "1e3" was read as the number 1: "1000" failed and "1" succeeded.
    assert check_answer("1", "1e3") is False
    assert check_answer("that is 1e3", "1e3") is True


# ---------------------------------------------------------------- contains / exact


@pytest.mark.parametrize("reply, expected, ok", [
    ("The capital is Paris.", "paris", True),
    ("The capital is   PARIS", "Paris", True),
    ("new\n\tyork city", "New York", True),
    ("Newyork", "New York", False),
    ("Lyon", "Paris", False),
    ("", "Paris", False),
    (None, "Paris", False),
    ("it is true", True, True),  # str(True) == "True", case-insensitive
])
def test_contains(reply, expected, ok: bool) -> None:
    assert check_answer(reply, expected, "contains") is ok


@pytest.mark.parametrize("reply, expected, ok", [
    ("Paris", "Paris", True),
    ("  paris.  ", "PARIS", True),  # case, surrounding whitespace, one trailing period
    ("Paris", "Paris.", True),
    ("New   York", "new york", True),
    ("Paris..", "Paris", False),  # only ONE trailing period is ignored
    ("The answer is Paris", "Paris", False),
    ("Paris!", "Paris", False),
    ("", "Paris", False),
])
def test_exact(reply: str, expected: str, ok: bool) -> None:
    assert check_answer(reply, expected, "exact") is ok


@pytest.mark.parametrize("check", ["contains", "exact", None])
@pytest.mark.parametrize("expected", ["", "   ", "\n"])
def test_empty_expected_is_a_check_error_not_a_match(check, expected: str) -> None:
    # "" is contained in every reply: it would label every run a success.
    with pytest.raises(CheckError, match="empty"):
        check_answer("anything at all", expected, check)


def test_missing_expected_is_a_check_error() -> None:
    with pytest.raises(CheckError, match="missing"):
        check_answer("42", None)
    with pytest.raises(CheckError, match="missing"):
        check_answer("42", None, "contains")


@pytest.mark.parametrize("check", ["fuzzy", "Numeric", "regex"])
def test_unknown_check_is_a_check_error(check: str) -> None:
    with pytest.raises(CheckError, match="unknown check"):
        check_answer("42", 42, check)


def test_check_error_is_a_value_error_and_checks_are_listed() -> None:
    assert issubclass(CheckError, ValueError)
    assert CHECKS == ("numeric", "contains", "exact")
