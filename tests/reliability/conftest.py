"""Fixtures of the reliability suite: the real encoder and decoder cores of the gateway tests."""

from tests.gateway.conftest import cores  # noqa: F401 - re-exported fixture
