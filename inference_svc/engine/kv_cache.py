"""Byte-honest helpers over transformers' DynamicCache."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache


def _tensors(cache: DynamicCache):
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            yield layer.keys
            yield layer.values


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes of storage the cache keeps alive (views count their whole storage)."""
    seen: dict[int, int] = {}
    for tensor in _tensors(cache):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def all_finite(cache: DynamicCache) -> bool:
    """No NaN or infinity anywhere in the cache (one that has them must not be reused)."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in _tensors(cache))


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def truncate(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` tokens, copying so the dropped storage is really freed."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            layer.keys = layer.keys[..., :length, :].clone()
            layer.values = layer.values[..., :length, :].clone()


def prefix_copy(cache: DynamicCache, length: int) -> DynamicCache:
    """An independent cache holding the first `length` tokens of `cache`."""
    clone = copy.copy(cache)
    clone.layers = [copy.copy(layer) for layer in cache.layers]
    truncate(clone, length)
    return clone


def move(cache: DynamicCache, device: str) -> None:
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            layer.keys = layer.keys.to(device)
            layer.values = layer.values.to(device)
            layer.device = layer.keys.device


def device_of(cache: DynamicCache) -> str | None:
    for tensor in _tensors(cache):
        return str(tensor.device)
    return None
