"""Probes: where memory readings come from."""
