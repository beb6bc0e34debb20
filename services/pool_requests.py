"""What the router sends the prefill and decode pools, and what they report back.

These cross Ray Serve handles (pickled between Baton's own processes, never from a
client): plain dataclasses of token ids, sampling parameters and the handoff.

A request made inside a traced span carries that span's context (`trace_context`, W3C
headers) so the pool's span joins the request's trace; `sent_at` (wall clock: the pool
may be on another host) measures how long it waited for a replica to take it up.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from engine.handoff import Handoff
from engine.hashing import KVFingerprint
from engine.kv_format import KVBlockFormat
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from services.tracing import inject


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: bytes = b""
    block_hashes: list[bytes] = field(default_factory=list)  # as the router computed them
    stored_prefix: int = 0  # leading blocks the router found in the KV store
    # The id the handoff's store lease takes, chosen by the router so that it can release
    # the lease of a prefill it gave up on, whose answer (the only other copy) it drops.
    lease_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    trace_context: dict[str, str] = field(default_factory=inject)
    sent_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class DecodeRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: bytes = b""
    handoff: Handoff | None = None  # None: decode prefills the prompt itself
    transfer_timeout_s: float = 10.0
    # Tokens a client already has (a migrated request): decode replays them into its
    # cache and its sampler, reports them again, and continues after them.
    output_prefix: list[int] = field(default_factory=list)
    # Without a handoff: the prompt's leading blocks the KV store holds (under the prefill
    # pool's fingerprint), for decode to import before it computes the short rest itself.
    stored_hashes: list[bytes] = field(default_factory=list)
    stored_fingerprint: KVFingerprint | None = None
    # While the request waits its turn in the replica (queued behind `max_num_seqs`), an
    # output without tokens this often, so that the router's stall check (silence for
    # `stall_timeout_s` means a dead replica) does not take a queue for a failure.
    keepalive_s: float | None = None
    trace_context: dict[str, str] = field(default_factory=inject)
    sent_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ModelCard:
    """What the router needs to know about the model a pool serves."""

    model_id: str
    tokenizer: Tokenizer
    fingerprint: KVFingerprint
    block_format: KVBlockFormat
    max_model_len: int
    vocab_size: int


@dataclass(frozen=True)
class PoolStats:
    """A replica's load and running totals, for routing and for /metrics."""

    pool: str
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    computed_tokens: int
    prompt_tokens: int
    cached_prompt_tokens: int  # local prefix-cache hits plus imported tokens
    generated_tokens: int
    fallbacks: dict[str, int] = field(default_factory=dict)
    kv_transfer_bytes: dict[str, int] = field(default_factory=dict)
    handed_over_prompt_tokens: int = 0  # of the cached, a handoff's KV (no cache hit)
