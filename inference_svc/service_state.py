"""What the servicers share: configuration, and the engine once the model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference_svc.config import ServerConfig
from inference_svc.engine.engine import Engine


@dataclass
class ServiceState:
    config: ServerConfig
    engine: Engine | None = None
    metrics: Any = None  # inference_svc.metrics.ServiceMetrics, once the server builds it
