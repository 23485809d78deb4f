"""Checkpoints on disk: directory kinds, bundles, the default bundle, GLM-4.1V, placement."""
