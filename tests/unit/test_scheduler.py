"""Scheduler and KV cache manager state, step by step, without a model (tokens are made up)."""

from engine.block_pool import BlockPool
from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request, RequestStatus

ROOT = b"\x00" * 32


def make(num_blocks=16, budget=64, max_seqs=8):
    pool = BlockPool(num_blocks)
    kv = KVCacheManager(pool, 16)
    return pool, kv, Scheduler(SchedulerConfig(max_seqs, budget, 1024), kv)


def req(rid, prompt, max_tokens=100):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), ROOT, 16)


def run_step(sched, token=7):
    batch = sched.schedule()
    for r in sched.advance(batch):
        r.append_token(token)
    return batch


def test_chunked_prefill_under_budget_then_decode():
    pool, kv, sched = make(budget=8)
    a = req("a", range(20))
    sched.add(a)
    chunks = [run_step(sched).prefills for _ in range(3)]
    assert [[(r.request_id, n) for r, n in c] for c in chunks] == [
        [("a", 8)],
        [("a", 8)],
        [("a", 4)],
    ]
    assert a.num_computed_tokens == 20 and a.num_tokens == 21
    batch = run_step(sched)
    assert batch.decodes == [a] and batch.prefills == []
    assert kv.block_ids(a) == [0, 1]
    assert list(pool.free_queue)[:2] == [2, 3]


def test_decodes_come_first_and_budget_is_shared():
    _, _, sched = make(budget=10)
    a, b = req("a", range(5)), req("b", range(100, 130))
    sched.add(a)
    run_step(sched)
    sched.add(b)
    batch = run_step(sched)
    assert batch.decodes == [a]
    assert [(r.request_id, n) for r, n in batch.prefills] == [("b", 9)]


def test_preemption_frees_the_newest_and_requeues_it_first():
    pool, kv, sched = make(num_blocks=4, budget=64)
    a, b, c = req("a", range(31)), req("b", range(100, 131)), req("c", range(200, 210))
    for r in (a, b, c):
        sched.add(r)
    run_step(sched)  # a, b take 2 blocks each; c does not fit
    assert [r.request_id for r in sched.running] == ["a", "b"]
    assert list(sched.waiting) == [c]
    assert run_step(sched).decodes == [a, b]  # position 31 still fits the second block
    batch = run_step(sched)  # position 32 needs a 3rd block: b, the newest, is preempted
    assert batch.preempted == [b] and batch.decodes == [a]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b, c]
    # b freed last-first (queue: 3, 2); a takes the head.
    assert kv.block_ids(b) == [] and kv.block_ids(a) == [0, 1, 3]
    assert list(pool.free_queue) == [2]
    assert b.num_preemptions == 1
    pool.check_invariants()


def test_prefix_hit_skips_cached_blocks_and_keeps_one_token_to_compute():
    pool, kv, sched = make()
    shared = list(range(48))
    a = req("a", [*shared, 1, 2, 3], max_tokens=1)
    sched.add(a)
    run_step(sched)
    sched.finish(a, RequestStatus.FINISHED_LENGTH)
    b = req("b", [*shared, 9, 9])
    sched.add(b)
    batch = run_step(sched)
    assert b.num_cached_tokens == 48
    assert [(r.request_id, n) for r, n in batch.prefills] == [("b", 2)]
    assert kv.block_ids(b)[:3] == [0, 1, 2]
    c = req("c", shared)  # fully cached: its last block is recomputed for the logits
    sched.add(c)
    batch = run_step(sched)
    assert c.num_cached_tokens == 32
    assert [(r.request_id, n) for r, n in batch.prefills] == [("c", 16)]
    assert kv.block_ids(c)[:2] == [0, 1] and kv.block_ids(c)[2] != 2
    pool.check_invariants()


def test_finish_returns_every_block():
    pool, _kv, sched = make()
    a = req("a", range(40))
    sched.add(a)
    run_step(sched)
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    assert pool.num_free_blocks == pool.num_blocks and not sched.has_work
    # Freed last-first: the prompt's tail blocks are evicted before its head.
    assert list(pool.free_queue)[-3:] == [2, 1, 0]


def imported(pool, request, num_blocks):
    """Pin blocks holding the request's first full blocks, as a KV handoff leaves them."""
    blocks = pool.allocate(num_blocks)
    for block, block_hash in zip(blocks, request.block_hashes, strict=False):
        pool.cache(block, block_hash)
    request.pinned = blocks


def test_pins_behind_a_stuck_head_are_released_newest_first():
    pool, kv, sched = make(num_blocks=4)
    a, b = req("a", range(33)), req("b", range(100, 133))  # 2 full blocks + 1 token each
    imported(pool, a, 2)  # blocks 0, 1
    imported(pool, b, 2)  # blocks 2, 3: nothing is free
    b.publish_limit = 2  # b's imports are named by another engine's fingerprint
    sched.add(a)
    sched.add(b)
    batch = run_step(sched)
    # a needs one block for its last token: b's pins go, tail first, and a takes b's tail.
    assert batch.decodes == [a] and a.num_cached_tokens == 32
    assert kv.block_ids(a) == [0, 1, 3] and b.pinned == [] and list(sched.waiting) == [b]
    assert list(pool.free_queue) == [2] and pool.lookup(b.block_hashes[0]) is pool.blocks[2]
    sched.finish(a, RequestStatus.FINISHED_LENGTH)
    batch = run_step(sched)
    # b re-hits the block that survived and recomputes the one a's tail overwrote.
    assert b.num_cached_tokens == 16
    assert [(r.request_id, n) for r, n in batch.prefills] == [("b", 17)]
    assert kv.block_ids(b) == [2, 3, 1]
    # What b computed itself is never cached under the other engine's names.
    assert b.publish_limit == 1 and pool.lookup(b.block_hashes[1]) is None
    pool.check_invariants()


def test_a_growing_request_takes_queued_pins_before_preempting():
    pool, kv, sched = make(num_blocks=4)
    a, c = req("a", range(31)), req("c", range(100, 133))
    sched.add(a)
    run_step(sched)  # a holds blocks 0, 1
    imported(pool, c, 2)  # blocks 2, 3
    sched.add(c)
    batch = run_step(sched)  # position 31 fits a's second block
    # While a runs, c waits for a's blocks and keeps its pins.
    assert batch.decodes == [a] and batch.prefills == [] and len(c.pinned) == 2
    batch = run_step(sched)  # position 32 needs a third block: c's pins go, not a
    assert batch.preempted == [] and batch.decodes == [a]
    assert c.pinned == [] and kv.block_ids(a) == [0, 1, 3] and list(pool.free_queue) == [2]
    assert c.status is RequestStatus.WAITING
    pool.check_invariants()
