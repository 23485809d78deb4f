"""Build hook: generate the gRPC code from protos/ before packaging.

Metadata lives in pyproject.toml; this file only adds code generation and the
client package's location (clients/python).
"""

import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "protos"))

from generate import generate  # noqa: E402

generate(ROOT)

setup(
    packages=[
        *find_packages(include=["inference_svc*", "memory_daemon*", "gateway*", "autoglm*"]),
        *find_packages("clients/python", include=["autoglm_client*"]),
    ],
    package_dir={"autoglm_client": "clients/python/autoglm_client"},
    package_data={"autoglm": ["**/*.pyi", "descriptor_set.binpb"]},
)
