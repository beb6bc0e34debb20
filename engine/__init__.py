"""Baton's shared engine: model, paged KV cache, scheduler and sampler.

Imports neither Ray, gRPC servers nor Kubernetes; services wrap it.
"""
