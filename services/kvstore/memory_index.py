"""InProcessPrefixIndex: the prefix index of a single shard, kept in its own memory."""

from __future__ import annotations

from collections.abc import Sequence

from services.kvstore.index import IndexEntry, Location, PrefixIndex, ShardInfo


class InProcessPrefixIndex(PrefixIndex):
    """Holds the shards that heartbeat into this process; nothing here is ever lost."""

    def __init__(self) -> None:
        self._shards: dict[str, ShardInfo] = {}
        self._entries: dict[bytes, tuple[str, IndexEntry]] = {}
        self._members: dict[str, set[bytes]] = {}

    async def lookup(self, hashes: Sequence[bytes]) -> list[Location]:
        locations = []
        for block_hash in hashes:
            shard_id, entry = self._entries.get(block_hash, ("", None))
            shard = self._shards.get(shard_id)
            if entry is None or shard is None:
                break
            locations.append(Location(shard, entry.size, entry.checksum))
        return locations

    async def live_shards(self) -> list[ShardInfo]:
        return sorted(self._shards.values(), key=lambda s: s.shard_id)

    async def heartbeat(self, shard: ShardInfo, ttl_s: float) -> bool:
        known = shard.shard_id in self._shards
        self._shards[shard.shard_id] = shard
        return not known

    async def update(
        self, shard_id: str, added: Sequence[IndexEntry], removed: Sequence[bytes]
    ) -> None:
        members = self._members.setdefault(shard_id, set())
        for entry in added:
            self._entries[entry.block_hash] = (shard_id, entry)
            members.add(entry.block_hash)
        for block_hash in removed:
            found = self._entries.get(block_hash)
            if found is not None and found[0] == shard_id:
                del self._entries[block_hash]
            members.discard(block_hash)

    async def reconcile(self, shard_id: str, inventory: Sequence[IndexEntry]) -> None:
        held = {e.block_hash for e in inventory}
        stale = self._members.get(shard_id, set()) - held
        await self.update(shard_id, inventory, sorted(stale))

    async def close(self) -> None:
        self._entries.clear()
