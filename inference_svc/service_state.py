"""What the servicers share: configuration, and the engine once the model is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from inference_svc.config import ServerConfig
from inference_svc.engine.engine import Engine


@dataclass
class ServiceState:
    config: ServerConfig
    engine: Engine | None = None
