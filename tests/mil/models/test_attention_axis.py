"""Attention column names that predict stores for the heatmap titles."""

from __future__ import annotations

import pytest

from mil.models import create_model


@pytest.mark.parametrize(
    ("name", "expected"),
    [("acmil", ["branch 1", "branch 2"]), ("dsmil", ["class 0", "class 1"]),
     ("abmil", ["head 1", "head 2"])],
)
def test_attention_names_follow_axis(name: str, expected: list[str]) -> None:
    model = create_model(name, in_dim=8, n_classes=2)
    assert model.attention_names(2) == expected
