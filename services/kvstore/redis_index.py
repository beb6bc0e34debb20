"""RedisPrefixIndex: the prefix index shared by every shard, in one Redis.

Keys (prefix `baton:kv:` by default):

    {p}generation            string  random id, created by the first shard to find it missing;
                                     a new id means Redis lost its data (restart, flush)
    {p}shards                set     ids of shards that have announced themselves
    {p}shard:{id}            string  the shard's gRPC address, with a TTL its heartbeat renews
    {p}shard:{id}:blocks     set     hex hashes of the blocks the shard announced
    {p}block:{hash hex}      string  "{shard id} {size} {checksum hex} {last access ms}"

Every operation is one round trip. A lookup of N hashes is one MGET of the N block keys
and the address keys of the shards this client knows, packed and parsed with C-level
joins, splits and maps (a Lua script doing the same MGET costs Redis ~4x as much, and
per-entry Python parsing costs more than the round trip: see bench/RESULTS.md). Updates
and heartbeats are Lua scripts, atomic. A block entry is one string so that a lookup
fetches one value per block. A block whose shard's address key has expired is a miss;
the next heartbeat of any live shard forgets such a shard.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from itertools import repeat
from typing import Any, cast

import grpc
import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError

from engine.hashing import HASH_BYTES
from services.kvstore.errors import KVStoreError
from services.kvstore.index import (
    IndexEntry,
    IndexRefusedError,
    Location,
    PrefixIndex,
    ShardInfo,
    redact_url,
)

DEFAULT_KEY_PREFIX = "baton:kv:"
_BATCH = 512  # entries per script call while reconciling: bounds how long Redis is busy

_UPDATE = """
local prefix, shard, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local members = prefix .. 'shard:' .. shard .. ':blocks'
local owned = shard .. ' '
local i = 4
for _ = 1, n do
  redis.call('SET', prefix .. 'block:' .. ARGV[i], owned .. ARGV[i + 1])
  redis.call('SADD', members, ARGV[i])
  i = i + 2
end
for j = i, #ARGV do
  local key = prefix .. 'block:' .. ARGV[j]
  local entry = redis.call('GET', key)
  if entry and string.sub(entry, 1, #owned) == owned then redis.call('DEL', key) end
  redis.call('SREM', members, ARGV[j])
end
return n
"""

_HEARTBEAT = """
local prefix, shard, address, ttl_ms, fresh = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local generation = redis.call('GET', prefix .. 'generation')
if not generation then
  generation = fresh
  redis.call('SET', prefix .. 'generation', generation)
end
local was_live = redis.call('EXISTS', prefix .. 'shard:' .. shard)
redis.call('SET', prefix .. 'shard:' .. shard, address, 'PX', ttl_ms)
redis.call('SADD', prefix .. 'shards', shard)
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'shards')) do
  if redis.call('EXISTS', prefix .. 'shard:' .. id) == 0 then
    local members = prefix .. 'shard:' .. id .. ':blocks'
    local owned = id .. ' '
    for _, h in ipairs(redis.call('SMEMBERS', members)) do
      local key = prefix .. 'block:' .. h
      local entry = redis.call('GET', key)
      if entry and string.sub(entry, 1, #owned) == owned then redis.call('DEL', key) end
    end
    redis.call('DEL', members)
    redis.call('SREM', prefix .. 'shards', id)
  end
end
return {generation, was_live}
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class IndexUnavailableError(KVStoreError):
    """Redis could not be reached or refused the operation."""

    code = grpc.StatusCode.UNAVAILABLE


class RedisPrefixIndex(PrefixIndex):
    """`url` is any URL redis-py takes: redis://[user:password@]host:port/db, rediss://
    for TLS (with `?ssl_ca_certs=/path/ca.pem` and the like), unix://. A user and password
    in the URL win over `username` and `password`."""

    def __init__(
        self,
        url: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout_s: float = 1.0,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.url = redact_url(url)  # what messages name: never the password
        self._prefix = key_prefix
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            username=username,
            password=password,
        )
        self._update = self._redis.register_script(_UPDATE)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._generation: bytes | None = None
        self._block_key = f"{key_prefix}block:".encode()
        self._shard_ids: list[bytes] = []  # shards whose liveness every lookup fetches

    async def lookup(self, hashes: Sequence[bytes]) -> list[Location]:
        if not hashes:
            return []
        for known in (True, False):
            if not known:
                await self._refresh_shard_ids()
            shard_ids = self._shard_ids
            reply = await self._mget(self._pack_lookup(hashes, shard_ids))
            entries = reply[: len(hashes)]
            hit = entries.index(None) if None in entries else len(entries)
            if hit == 0:
                return []
            # entries are "{shard id} {size} {checksum hex} {last access ms}"
            fields = b" ".join(cast(list[bytes], entries[:hit])).split(b" ")
            owners = fields[0::4]
            if known and not set(owners) <= set(shard_ids):
                continue  # a shard this client has not seen yet: learn the shards, retry
            live = {
                s: ShardInfo(s.decode(), a.decode())
                for s, a in zip(shard_ids, reply[len(hashes) :], strict=True)
                if a is not None
            }
            if not set(owners) <= live.keys():
                owners = owners[: next(i for i, s in enumerate(owners) if s not in live)]
            # C-level maps: a Python loop over hundreds of entries costs more than Redis
            return list(
                map(
                    tuple.__new__,
                    repeat(Location),
                    zip(
                        map(live.__getitem__, owners),
                        map(int, fields[1::4]),
                        map(int, fields[2::4], repeat(16)),
                        strict=False,  # owners may stop short, at a dead shard
                    ),
                )
            )
        raise AssertionError("unreachable: the second pass knows every shard")

    async def live_shards(self) -> list[ShardInfo]:
        try:
            ids = sorted(map(_text, await self._redis.smembers(self._prefix + "shards")))
            if not ids:
                return []
            addresses = await self._redis.mget([f"{self._prefix}shard:{i}" for i in ids])
        except RedisError as exc:
            raise self._failure(exc) from exc
        return [ShardInfo(i, _text(a)) for i, a in zip(ids, addresses, strict=True) if a]

    async def heartbeat(self, shard: ShardInfo, ttl_s: float) -> bool:
        generation, was_live = await self._call(
            self._heartbeat,
            [
                self._prefix,
                shard.shard_id,
                shard.address,
                max(1, int(ttl_s * 1000)),
                secrets.token_hex(8),
            ],
        )
        lost = generation != self._generation or not was_live
        self._generation = generation
        return bool(lost)

    async def update(
        self, shard_id: str, added: Sequence[IndexEntry], removed: Sequence[bytes]
    ) -> None:
        args: list[str | int] = [self._prefix, shard_id, len(added)]
        for e in added:
            args += [e.block_hash.hex(), f"{e.size} {e.checksum:016x} {e.last_access_ms}"]
        args += [h.hex() for h in removed]
        await self._call(self._update, args)

    async def reconcile(self, shard_id: str, inventory: Sequence[IndexEntry]) -> None:
        try:
            indexed = await self._redis.smembers(f"{self._prefix}shard:{shard_id}:blocks")
        except RedisError as exc:
            raise self._failure(exc) from exc
        held = {e.block_hash for e in inventory}
        stale = sorted(h for h in map(bytes.fromhex, map(_text, indexed)) if h not in held)
        for i in range(0, len(stale), _BATCH):
            await self.update(shard_id, [], stale[i : i + _BATCH])
        for i in range(0, len(inventory), _BATCH):
            await self.update(shard_id, inventory[i : i + _BATCH], [])

    async def close(self) -> None:
        await self._redis.aclose()

    async def _refresh_shard_ids(self) -> None:
        try:
            ids = await self._redis.smembers(self._prefix + "shards")
        except RedisError as exc:
            raise self._failure(exc) from exc
        self._shard_ids = sorted(i if isinstance(i, bytes) else i.encode() for i in ids)

    def _pack_lookup(self, hashes: Sequence[bytes], shard_ids: Sequence[bytes]) -> bytes:
        """`MGET block:{hex}... shard:{id}...` in RESP, built by a few C calls: packing
        each of hundreds of keys in Python costs more than Redis takes to answer."""
        key_head = b"$%d\r\n%s" % (len(self._block_key) + 2 * HASH_BYTES, self._block_key)
        block_keys = b"".join(hashes).hex("|", HASH_BYTES).encode()
        return b"".join(
            (
                b"*%d\r\n$4\r\nMGET\r\n" % (1 + len(hashes) + len(shard_ids)),
                key_head,
                block_keys.replace(b"|", b"\r\n" + key_head),
                b"\r\n",
                *(b"$%d\r\n%s\r\n" % (len(k), k) for k in map(self._shard_key, shard_ids)),
            )
        )

    def _shard_key(self, shard_id: bytes) -> bytes:
        return self._prefix.encode() + b"shard:" + shard_id

    async def _mget(self, command: bytes) -> list[bytes | None]:
        pool = self._redis.connection_pool
        try:
            connection = await pool.get_connection()
            try:
                await connection.send_packed_command(command)
                reply: list[bytes | None] = await connection.read_response()
            finally:
                await pool.release(connection)
        except RedisError as exc:
            raise self._failure(exc) from exc
        return reply

    def _failure(self, exc: RedisError) -> KVStoreError:
        if isinstance(exc, AuthenticationError):
            return IndexRefusedError(
                f"prefix index at {self.url} refused this shard's credentials ({exc}): give "
                "Redis's password in the URL (redis://:PASSWORD@host:6379/0, or "
                "redis://USER:PASSWORD@... for an ACL user) or in BATON_REDIS_PASSWORD"
            )
        if isinstance(exc, NoPermissionError):
            return IndexRefusedError(
                f"prefix index at {self.url}: the Redis user may not run a command the index "
                f"needs ({exc}); allow it read, write and scripting commands on keys "
                f"{self._prefix}*"
            )
        return IndexUnavailableError(f"prefix index at {self.url} unavailable: {exc}")

    async def _call(self, script: AsyncScript, args: Sequence[str | int]) -> Any:
        try:
            return await script(args=args)
        except RedisError as exc:
            raise self._failure(exc) from exc
