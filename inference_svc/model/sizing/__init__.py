"""Sizing a model for cards: its tensors, their bytes per weight precision, and the plan
that fits them with the KV cache onto one or more cards (autoglm-plan)."""
