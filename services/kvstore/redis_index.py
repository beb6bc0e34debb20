"""RedisPrefixIndex: the prefix index shared by every shard, in one Redis.

Keys (prefix `baton:kv:` by default):

    {p}generation            string  random id, created by the first shard to find it missing;
                                     a new id means Redis lost its data (restart, flush)
    {p}shards                set     ids of shards that have announced themselves
    {p}shard:{id}            string  the shard's gRPC address, with a TTL its heartbeat renews
    {p}shard:{id}:blocks     set     hex hashes of the blocks the shard announced
    {p}block:{hash hex}      string  "{shard id} {size} {checksum hex} {last access ms}"

Every operation is one round trip: a Lua script, so a lookup of N hashes, an update of N
entries or a heartbeat is atomic and costs one network hop. A block entry is one string so
that a lookup is a single MGET inside the script (a hash per block costs Redis about four
times as much). A block whose shard's address key has expired is a miss; the next
heartbeat of any live shard forgets such a shard.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import grpc
import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from services.kvstore.errors import KVStoreError
from services.kvstore.index import IndexEntry, Location, PrefixIndex, ShardInfo

DEFAULT_KEY_PREFIX = "baton:kv:"
_BATCH = 512  # entries per script call while reconciling: bounds how long Redis is busy

# ARGV: prefix, the hex hashes concatenated. Returns {"id address\n...", "entry\n..."}:
# the live shards seen and the entries of the longest live prefix. Two strings rather than
# nested arrays: building and parsing per-entry replies cost more than the MGET itself.
_LOOKUP = r"""
local prefix, hexes = ARGV[1], ARGV[2]
local live, shards, entries = {}, {}, {}
for first = 1, #hexes, 64 * 4096 do
  local keys = {}
  for i = first, math.min(first + 64 * 4096, #hexes + 1) - 1, 64 do
    keys[#keys + 1] = prefix .. 'block:' .. string.sub(hexes, i, i + 63)
  end
  local batch = redis.call('MGET', unpack(keys))
  for i = 1, #batch do
    local entry = batch[i]
    if not entry then break end
    local shard = string.match(entry, '^%S+')
    if live[shard] == nil then
      live[shard] = redis.call('GET', prefix .. 'shard:' .. shard) or false
      if live[shard] then shards[#shards + 1] = shard .. ' ' .. live[shard] end
    end
    if not live[shard] then break end
    entries[#entries + 1] = entry
  end
  if #entries < first / 64 + #batch - 1 then break end
end
return {table.concat(shards, '\n'), table.concat(entries, '\n')}
"""

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
    def __init__(
        self, url: str, key_prefix: str = DEFAULT_KEY_PREFIX, timeout_s: float = 1.0
    ) -> None:
        self.url = url
        self._prefix = key_prefix
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._lookup = self._redis.register_script(_LOOKUP)
        self._update = self._redis.register_script(_UPDATE)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._generation: bytes | None = None

    async def lookup(self, hashes: Sequence[bytes]) -> list[Location]:
        if not hashes:
            return []
        shards, entries = await self._call(
            self._lookup, [self._prefix, "".join(h.hex() for h in hashes)]
        )
        if not entries:
            return []
        live = {}
        for line in shards.decode().split("\n"):
            shard_id, address = line.split(" ")
            live[shard_id] = ShardInfo(shard_id, address)
        locations = []
        for entry in entries.decode().split("\n"):
            shard_id, size, checksum, _ = entry.split(" ")
            locations.append(Location(live[shard_id], int(size), int(checksum, 16)))
        return locations

    async def live_shards(self) -> list[ShardInfo]:
        try:
            ids = sorted(map(_text, await self._redis.smembers(self._prefix + "shards")))
            if not ids:
                return []
            addresses = await self._redis.mget([f"{self._prefix}shard:{i}" for i in ids])
        except RedisError as exc:
            raise IndexUnavailableError(f"prefix index at {self.url} unavailable: {exc}") from exc
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
            raise IndexUnavailableError(f"prefix index at {self.url} unavailable: {exc}") from exc
        held = {e.block_hash for e in inventory}
        stale = sorted(h for h in map(bytes.fromhex, map(_text, indexed)) if h not in held)
        for i in range(0, len(stale), _BATCH):
            await self.update(shard_id, [], stale[i : i + _BATCH])
        for i in range(0, len(inventory), _BATCH):
            await self.update(shard_id, inventory[i : i + _BATCH], [])

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, script: AsyncScript, args: Sequence[str | int]) -> Any:
        try:
            return await script(args=args)
        except RedisError as exc:
            raise IndexUnavailableError(f"prefix index at {self.url} unavailable: {exc}") from exc
