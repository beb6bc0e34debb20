"""KVPort.read_blocks / write_blocks: whole blocks between a paged cache and a staging
buffer (host memory the KV store's client sends from and receives into), on this machine's
device (`interp`: CPU in CI; `cuda`: a GPU cache and pinned host buffers)."""

from __future__ import annotations

import pytest
import torch

from engine.block_pool import BlockPool
from engine.kv_port import KVPort

SHAPE = (3, 2, 16, 2, 8)  # layers, K|V, block size, kv heads, head dim


def _port(device: torch.device, blocks: int) -> KVPort:
    cache = torch.randn((blocks, *SHAPE), device=device).to(torch.bfloat16)
    return KVPort(BlockPool(blocks), cache)


def test_blocks_travel_through_a_host_buffer_unchanged(device: torch.device):
    src, dst = _port(device, 10), _port(device, 12)
    before = dst.kv_cache.clone()
    staging = torch.empty((3, *SHAPE), dtype=torch.bfloat16, pin_memory=device.type == "cuda")
    src.read_blocks([7, 2, 5], staging)
    assert staging.device.type == "cpu"
    assert torch.equal(staging.to(device), src.kv_cache[[7, 2, 5]])
    dst.write_blocks([0, 11, 4], staging)
    assert torch.equal(dst.kv_cache[[0, 11, 4]], src.kv_cache[[7, 2, 5]])
    untouched = [i for i in range(12) if i not in (0, 11, 4)]
    assert torch.equal(dst.kv_cache[untouched], before[untouched])


def test_block_counts_must_match(device: torch.device):
    port = _port(device, 4)
    with pytest.raises(ValueError, match="2 blocks into a buffer of 3"):
        port.read_blocks([0, 1], torch.empty((3, *SHAPE), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="3 blocks for 1 destinations"):
        port.write_blocks([0], torch.empty((3, *SHAPE), dtype=torch.bfloat16))
