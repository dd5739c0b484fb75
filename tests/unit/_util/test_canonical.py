# SPDX-License-Identifier: Apache-2.0
"""The fast canonical encoder agrees byte for byte with the rfc8785 reference."""

from __future__ import annotations

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from haios._util.canonical import canonical_bytes

scalars = (st.none() | st.booleans() | st.integers(-(2**60), 2**60)
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(alphabet=st.characters(exclude_categories=("Cs",))))
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=8),
                      children, max_size=5),
    max_leaves=30)


def _agree(document: object) -> None:
    try:
        expected = bytes(rfc8785.dumps(document))
    except rfc8785.CanonicalizationError:
        with pytest.raises(rfc8785.CanonicalizationError):
            canonical_bytes(document)
        return
    assert canonical_bytes(document) == expected


@given(documents)
@settings(max_examples=800, deadline=None)
def test_matches_the_reference(document: object) -> None:
    _agree(document)


def test_known_cases() -> None:
    for value in [{"b": 2.0, "a": [1, 0.5, -3.25]}, {"x": "\u2028\u001f\"\\"}, 0.1, 1e21,
                  1e-7, -0.0, 2**53 - 1, 2**53, {"é": 1, "e": 2}, 123456789012345.0]:
        _agree(value)
