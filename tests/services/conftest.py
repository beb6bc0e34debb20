"""Fixtures of the stack tests: a KV store shard process and a disaggregated stack on it,
one of each per module (a module may stop its shard, or define its own stack)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.loaders import LoadedCheckpoint
from tests.services.stack import Shard, Stack


@pytest.fixture(scope="module")
def shard() -> Iterator[Shard]:
    s = Shard()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stack(default_checkpoint: LoadedCheckpoint, shard: Shard) -> Iterator[Stack]:
    stack = Stack(default_checkpoint, shard)
    yield stack
    stack.shutdown()
