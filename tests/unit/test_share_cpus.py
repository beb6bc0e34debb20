"""`baton serve`'s threads per replica: decode replicas share the cores among themselves,
prefill replicas among all replicas, and a pool's own torch_threads is kept."""

from __future__ import annotations

from baton.serve import share_cpus
from services.serving_config import ServingConfig


def threads(cpus: int, mode: str = "disaggregated", **pools: dict) -> tuple[int | None, int | None]:
    linear = {"decode": "int4", "prefill": "fp8"}
    sections = {p: {"linear": linear[p], **pool} for p, pool in pools.items()}
    data = ServingConfig.model_validate({"mode": mode, **sections}).model_dump()
    share_cpus(data, cpus)
    return data["decode"]["torch_threads"], data["prefill"]["torch_threads"]


def test_decode_overlaps_the_prefill_pools_share() -> None:
    assert threads(2) == (2, 1)
    assert threads(16, decode={"replicas": 2}, prefill={"replicas": 2}) == (8, 4)
    assert threads(3, decode={"replicas": 4}, prefill={"replicas": 2}) == (1, 1)


def test_colocated_gives_decode_every_core_and_leaves_prefill_alone() -> None:
    assert threads(4, mode="colocated") == (4, None)


def test_a_pools_own_threads_are_kept() -> None:
    assert threads(8, decode={"torch_threads": 3}) == (3, 4)
    assert threads(8, prefill={"torch_threads": 5}) == (8, 5)
