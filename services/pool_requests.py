"""What the router sends the prefill and decode pools, and what they report back.

These cross Ray Serve handles (pickled between Baton's own processes, never from a
client): plain dataclasses of token ids, sampling parameters and the handoff.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.handoff import Handoff
from engine.hashing import KVFingerprint
from engine.kv_format import KVBlockFormat
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: bytes = b""
    block_hashes: list[bytes] = field(default_factory=list)  # as the router computed them
    stored_prefix: int = 0  # leading blocks the router found in the KV store


@dataclass(frozen=True)
class DecodeRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: bytes = b""
    handoff: Handoff | None = None  # None: decode prefills the prompt itself
    transfer_timeout_s: float = 10.0


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
    """A replica's load, for routing and for /metrics."""

    pool: str
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    computed_tokens: int
    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int
    fallbacks: dict[str, int] = field(default_factory=dict)
    kv_transfer_bytes: dict[str, int] = field(default_factory=dict)
    kv_transfer_seconds: float = 0.0
