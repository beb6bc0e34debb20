"""Baton's KV block store: one shard of the prefix cache, its prefix index and its client.

A shard (`KVStoreServer`) keeps paged KV blocks in a host-memory arena, pins in-flight
handoffs with leases and announces what it holds to a prefix index shared by every shard.
Prefill and decode workers talk to the shards through `KVStoreClient`.
"""
