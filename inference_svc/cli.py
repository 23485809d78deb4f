"""autoglm-server: the console entry point."""

from __future__ import annotations

import asyncio
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from inference_svc.config import config_from_args

    try:
        config = config_from_args(argv)
    except ValueError as exc:
        print(f"autoglm-server: error: {exc}", file=sys.stderr)
        return 2
    # Configure logging before the heavy imports so their warnings are structured too.
    from autoglm_common.logging_setup import configure_logging

    configure_logging(fmt=config.log_format, level=config.log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # transformers imports torchao whenever it is installed; on a CPU build torchao says at
    # import that its CUDA kernels do not load, and torch that its enums are registered
    # the old way: nothing an operator can act on, on every start
    for library in ("torchao", "torch.utils._pytree"):
        logging.getLogger(library).setLevel(logging.ERROR)
    from inference_svc.engine.kv_pool_sizing import NoRoomForKV
    from inference_svc.model.checkpoints.glm4v_config import UnreadableCheckpoint
    from inference_svc.model.checkpoints.placement import UnplaceableDevice
    from inference_svc.model.paged.flex_decode import UnsupportedPagedAttention
    from inference_svc.model.precision import UnsupportedPrecision
    from inference_svc.server import serve

    try:
        return asyncio.run(serve(config))
    except (UnreadableCheckpoint, UnsupportedPrecision, UnplaceableDevice, NoRoomForKV,
            UnsupportedPagedAttention) as exc:
        print(f"autoglm-server: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
