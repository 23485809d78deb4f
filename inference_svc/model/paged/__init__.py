"""Paged attention plumbing: KV block pool, paged forward, segment steps, decode graphs."""
