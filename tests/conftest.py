"""Shared fixtures: one running stack for the tests that can share it, and
fresh stacks for tests that kill or reconfigure services. Area fixtures (the
test registry and images, pods, containers, streaming clients) live in their
own modules, registered here."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.harness import Stack

# The node lane boots a guest: only `make test-node` (PYRIO_NODE_LANE=1) collects it.
if not os.environ.get("PYRIO_NODE_LANE"):
    collect_ignore = ["node"]

pytest_plugins = [
    "tests.fixtures_images",
    "tests.fixtures_pods",
    "tests.fixtures_containers",
    "tests.fixtures_streaming",
    "tests.fixtures_faults",
]


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
