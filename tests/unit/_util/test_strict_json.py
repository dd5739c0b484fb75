# SPDX-License-Identifier: Apache-2.0
"""Strict JSON refuses every parser differential the catalog lists (A1-A6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from haios._util.strict_json import StrictJSONError, parse_strict_json, printable

SUITE = Path(__file__).resolve().parents[4] / "shared" / "data" / "jsontestsuite" / "test_parsing"


@pytest.mark.parametrize("data", [
    b'{"a": 1, "a": 2}', b"NaN", b"[Infinity]", b"[-Infinity]", b"[1e400]",
    b'\xef\xbb\xbf{}', '{"a": 1}'.encode("utf-16"), b'{"a": "\\ud800"}', b"{} {}",
    b"[1,]", b"// c\n{}", b"", b"   ", b"[" + b"1" * 5000 + b"]", b'"\xff"', b"\xc0\xaf",
    b"[" * 33 + b"]" * 33,
])
def test_hostile_documents_are_refused(data: bytes) -> None:
    with pytest.raises(StrictJSONError):
        parse_strict_json(data)


def test_deep_nesting_is_refused_without_recursion() -> None:
    with pytest.raises(StrictJSONError, match="nesting"):
        parse_strict_json(b"[" * 100_000 + b"]" * 100_000)


def test_nesting_at_the_bound_is_accepted() -> None:
    assert parse_strict_json(b"[" * 32 + b"]" * 32) is not None


def test_brackets_inside_strings_do_not_count() -> None:
    assert parse_strict_json(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') == {
        "a": "[" * 37}


@pytest.mark.skipif(not SUITE.is_dir(), reason="JSONTestSuite not beside the checkout")
def test_json_test_suite_n_and_y_cases() -> None:
    for case in sorted(SUITE.iterdir()):
        data = case.read_bytes()
        if case.name.startswith("n_"):
            with pytest.raises(StrictJSONError):
                parse_strict_json(data)
        elif case.name.startswith("y_") and "duplicated" not in case.name:
            try:
                parse_strict_json(data)
            except StrictJSONError as exc:
                # accepted-by-spec documents we refuse on purpose: depth, huge ints
                assert "nesting" in str(exc) or "range" in str(exc), case.name


@pytest.mark.parametrize(("text", "shown"), [
    ("plain text, é and ✓", "plain text, é and ✓"),
    ("a\x00b", "a\\x00b"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("tab\tnewline\ncr\r", "tab\\x09newline\\x0acr\\x0d"),
    ("\x7f\x85\x9b", "\\x7f\\x85\\x9b"),
    ("\u2028\u2029\u202e\ufeff", "\\u2028\\u2029\\u202e\\ufeff"),
    ("\ud800", "\\ud800"),
    ("\U000e0041", "\\U000e0041"),
    ("already \\x00 escaped", "already \\x00 escaped"),
])
def test_printable_escapes_every_non_printable_character(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert printable(shown) == shown  # escaping twice changes nothing
    assert shown.isprintable()
