"""Shared fixtures: one running stack for the tests that can share it, and
fresh stacks for tests that kill or reconfigure services."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.harness import Stack


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    shared = Stack()
    try:
        shared.start()
        yield shared
    finally:
        shared.stop()


@pytest.fixture
def fresh_stack() -> Iterator[Stack]:
    own = Stack()
    try:
        own.start()
        yield own
    finally:
        own.stop()
