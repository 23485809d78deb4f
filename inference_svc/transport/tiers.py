"""Residency tiers on the wire: a unit's tier ("cuda:N", "cpu", "disk") and the Tier enum.

The inference and control APIs each declare Tier as an alias of autoglm.common.v1.Tier,
number for number, so this one map serves both.
"""

from __future__ import annotations

from autoglm.common.v1 import tier_pb2
from inference_svc.model.units import DISK

HOST_TIERS = {"cpu": tier_pb2.TIER_CPU, DISK: tier_pb2.TIER_DISK}
TIER_NAMES = {number: name for name, number in HOST_TIERS.items()}  # offload targets


def tier_to_pb(tier: str) -> int:
    return tier_pb2.TIER_GPU if tier.startswith("cuda") else HOST_TIERS[tier]
