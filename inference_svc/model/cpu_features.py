"""What this machine's CPU computes natively that the host layers choose by.

`BF16_UNITS`: bfloat16 matrix units, AMX tiles or AVX512-BF16 (Intel since Cooper Lake
and Sapphire Rapids, AMD since Zen 4). oneDNN multiplies bfloat16 there several times
faster than float32 (a 128-row chunk through GLM-4.1V-9B's gate/up weight: 52 against
168 ms on 2 cores with AMX); elsewhere it emulates bfloat16, slower than float32.
"""

from __future__ import annotations

import torch


def has_bf16_units() -> bool:
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)()
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


BF16_UNITS = has_bf16_units()
