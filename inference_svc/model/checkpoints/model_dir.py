"""Which kind of model directory the service is given: the one place that decides."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from inference_svc.model.checkpoints.bundle import MANIFEST, is_bundle
from inference_svc.model.checkpoints.glm4v_checkpoint import ARCHITECTURE, is_glm4v_checkpoint


class ModelKind(StrEnum):
    MODULAR = "modular"  # a modular bundle (bundle.py)
    GLM4V = "glm4v"  # a native GLM-4.1V checkpoint (glm4v_checkpoint.py)


class NotAModelDirectory(FileNotFoundError):
    """The directory holds neither kind of model."""


def model_kind(directory: Path) -> ModelKind:
    if is_bundle(directory):
        return ModelKind.MODULAR
    if is_glm4v_checkpoint(directory):
        return ModelKind.GLM4V
    raise NotAModelDirectory(
        f"{directory} is neither a modular bundle ({MANIFEST}) nor a native GLM-4.1V "
        f"checkpoint (config.json with architectures [\"{ARCHITECTURE}\"])"
    )
