"""Choosing and loading the model named by the configuration."""

from __future__ import annotations

import time

import structlog
import torch

from inference_svc.config import ServerConfig
from inference_svc.model.checkpoints.default_bundle import default_cache_dir, ensure_default_bundle
from inference_svc.model.checkpoints.model_dir import ModelKind, model_kind
from inference_svc.model.checkpoints.placement import (
    Placement,
    UnplaceableDevice,
    plan_placement,
)
from inference_svc.model.glm4v import Glm4vModel
from inference_svc.model.modular import ModularModel
from inference_svc.model.precision import WeightPrecision, resolve_precision
from inference_svc.model.units import weights_by_device
from inference_svc.process_memory import host_memory_bytes, rss_bytes

log = structlog.get_logger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def load_model(config: ServerConfig) -> ModularModel | Glm4vModel:
    started = time.monotonic()
    bundle = config.model_dir
    if bundle is None:
        cache = config.cache_dir or default_cache_dir()
        bundle = ensure_default_bundle(cache)
        log.info("default_bundle_ready", path=str(bundle),
                 seconds=round(time.monotonic() - started, 2))
    placement = plan_placement(config.device, encoder_device=config.encoder_device,
                               kv_reserve_fraction=config.kv_reserve_fraction)
    dtype = resolve_dtype(config.dtype, placement.encoder_device)
    modular = model_kind(bundle) is ModelKind.MODULAR
    if not modular and placement.sharded:  # GLM-4.1V: its layers over every GPU, in order
        placement = Placement("split", placement.encoder_device, layer_devices=tuple(
            f"cuda:{index}" for index in range(torch.cuda.device_count())))
    if modular and placement.layer_devices:
        raise UnplaceableDevice(f"--device {config.device}: a device list splits a GLM-4.1V "
                                "checkpoint's layers; the modular bundle's decoder spreads "
                                "over the GPUs with --device auto")
    decoder_weights, vision_weights = weight_precisions(config, placement, dtype,
                                                        modular=modular)
    if modular:
        model = ModularModel(bundle, dtype=dtype, placement=placement,
                             decoder_weights=decoder_weights, vision_weights=vision_weights)
    else:
        model = Glm4vModel(bundle, device=placement.encoder_device, dtype=dtype,
                           content_format=config.chat_content_format,
                           decoder_weights=decoder_weights, vision_weights=vision_weights,
                           layer_devices=placement.layer_devices)
    log.info("model_loaded", name=model.name, path=str(bundle), device=config.device,
             dtype=str(model.dtype), seconds=round(time.monotonic() - started, 2),
             precision={u.name: u.precision for u in model.units},
             weight_bytes_by_device=weights_by_device(u.state() for u in model.units),
             rss_bytes=rss_bytes())
    return model


def weight_precisions(config: ServerConfig, placement: Placement, dtype: torch.dtype, *,
                      modular: bool) -> tuple[WeightPrecision, WeightPrecision]:
    """The decoder's and the vision encoder's precisions, checked against the devices
    they go to before anything loads (UnsupportedPrecision names the flag)."""
    if placement.sharded:
        decoder_devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    elif placement.layer_devices:
        decoder_devices = list(placement.layer_devices)
    else:  # a GLM-4.1V checkpoint goes whole onto the encoders' device
        decoder_devices = [placement.decoder_device if modular else placement.encoder_device]
    return (resolve_precision("--decoder-weights", config.decoder_weights, dtype,
                              decoder_devices),
            resolve_precision("--vision-weights", config.vision_weights, dtype,
                              [placement.encoder_device]))


def kv_budget_bytes(config: ServerConfig, model) -> int:
    """The KV budget: fixed bytes, or a fraction of the decoder device's memory."""
    if config.kv_budget_fraction <= 0:
        return config.engine.kv_budget_bytes
    device = str(model.device)
    if device.startswith("cuda"):
        total = torch.cuda.mem_get_info(torch.device(device))[1]
    else:
        total = host_memory_bytes()
    budget = int(total * config.kv_budget_fraction)
    log.info("kv_budget", device=device, fraction=config.kv_budget_fraction, bytes=budget)
    return budget
