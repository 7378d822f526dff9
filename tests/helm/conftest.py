"""The chart is rendered once per values file and shared by the tests of a session."""

from __future__ import annotations

import pytest

from tests.helm import chartkit


@pytest.fixture(scope="session")
def rendered():
    cache: dict[str, list] = {}

    def get(case: str) -> list:
        if case not in cache:
            cache[case] = chartkit.render(chartkit.CASES[case])
        return cache[case]

    return get
