"""Server configuration: flags, environment, validation, KV budget resolution."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from inference_svc.config import config_from_args
from inference_svc.loading import kv_budget_bytes


def test_flags_and_environment_set_the_config(monkeypatch):
    monkeypatch.setenv("AUTOGLM_PORT", "6000")
    monkeypatch.setenv("AUTOGLM_TEMPERATURE", "0.3")
    config = config_from_args(["--max-new-tokens", "64", "--kv-budget-mb", "10"])
    assert config.port == 6000
    assert config.defaults.temperature == pytest.approx(0.3)
    assert config.defaults.max_new_tokens == 64
    assert config.defaults.min_new_tokens == 32
    assert config.kv_budget_bytes == 10 * 1024 * 1024


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--port", "70000"], "port"),
        (["--control-tcp", "127.0.0.1:1"], "control-token"),
        (["--dtype", "int3"], "dtype"),
        (["--kv-budget-fraction", "1.5"], "kv budget fraction"),
        (["--pressure-max-pixels", "10"], "pressure max pixels"),
    ],
)
def test_bad_configuration_exits_2_with_a_clear_message(argv, fragment):
    result = subprocess.run([sys.executable, "-m", "inference_svc.cli", *argv],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert fragment in result.stderr


def test_kv_budget_can_be_a_fraction_of_the_decoders_device():
    config = config_from_args(["--kv-budget-fraction", "0.25"])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert kv_budget_bytes(config, SimpleNamespace(device="cpu")) == int(host * 0.25)
    fixed = config_from_args(["--kv-budget-mb", "3"])
    assert kv_budget_bytes(fixed, SimpleNamespace(device="cpu")) == 3 * 1024 * 1024
