"""Server configuration: flags, environment, validation, KV budget resolution."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from inference_svc.config import TlsFiles, config_from_args
from inference_svc.loading import kv_budget_bytes
from inference_svc.server import server_options


def test_flags_and_environment_set_the_config(monkeypatch):
    monkeypatch.setenv("AUTOGLM_PORT", "6000")
    monkeypatch.setenv("AUTOGLM_TEMPERATURE", "0.3")
    monkeypatch.setenv("AUTOGLM_KV_BLOCK_TOKENS", "32")
    config = config_from_args(["--max-new-tokens", "64", "--kv-budget-mb", "10"])
    assert config.engine.kv_block_tokens == 32
    assert config_from_args(["--queue-timeout", "90"]).engine.queue_timeout_s == 90
    assert config.port == 6000
    assert config.defaults.temperature == pytest.approx(0.3)
    assert config.defaults.max_new_tokens == 64
    assert config.defaults.min_new_tokens == 32
    assert config.engine.kv_budget_bytes == 10 * 1024 * 1024


def test_every_engine_knob_has_a_flag_and_a_variable(monkeypatch):
    monkeypatch.setenv("AUTOGLM_PRESSURE_FRACTION", "0.5")
    monkeypatch.setenv("AUTOGLM_NO_PREFIX_CACHING", "1")
    monkeypatch.setenv("AUTOGLM_TOP_K", "40")
    config = config_from_args(["--max-batch", "3"])
    assert (config.engine.pressure_fraction, config.engine.prefix_caching) == (0.5, False)
    assert (config.engine.max_batch, config.defaults.top_k) == (3, 40)
    flags = config_from_args(["--pressure-fraction", "0.75", "--prefix-caching"])
    assert (flags.engine.pressure_fraction, flags.engine.prefix_caching) == (0.75, True)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--port", "70000"], "port"),
        (["--model-dir", "/nonexistent/model"], "--model-dir /nonexistent/model is not a"),
        (["--pressure-fraction", "0"], "pressure fraction"),
        (["--log-level", "loud"], "log level"),
        (["--control-tcp", "127.0.0.1:1"], "control-token"),
        (["--dtype", "int3"], "dtype"),
        (["--kv-budget-fraction", "1.5"], "kv budget fraction"),
        (["--pressure-max-pixels", "10"], "pressure max pixels"),
        (["--control-tcp", "127.0.0.1:1", "--control-token", "t"], "--control-insecure"),
        (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"],
         "--tls-cert /nonexistent/cert.pem is not a readable file"),
        (["--max-concurrent-streams", "0"], "max concurrent streams"),
        (["--prefill-chunk-tokens", "-1"], "prefill chunk tokens"),
        (["--kv-block-tokens", "0"], "KV block tokens"),
        (["--queue-timeout", "0"], "queue timeout"),
        (["--watchdog-timeout", "-5"], "watchdog timeout"),
        (["--max-connection-age", "-1"], "max connection age"),
    ],
)
def test_bad_configuration_exits_2_with_a_clear_message(argv, fragment):
    result = subprocess.run([sys.executable, "-m", "inference_svc.cli", *argv],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert fragment in result.stderr


def test_prefill_chunk_follows_the_device_unless_set(monkeypatch):
    from inference_svc.engine.engine import default_prefill_chunk

    assert config_from_args([]).engine.prefill_chunk_tokens is None
    assert default_prefill_chunk("cpu") < default_prefill_chunk("cuda:0")
    assert config_from_args(["--prefill-chunk-tokens", "0"]).engine.prefill_chunk_tokens == 0
    monkeypatch.setenv("AUTOGLM_PREFILL_CHUNK_TOKENS", "64")
    monkeypatch.setenv("AUTOGLM_WATCHDOG_TIMEOUT", "7.5")
    config = config_from_args([])
    assert (config.engine.prefill_chunk_tokens, config.watchdog_timeout_s) == (64, 7.5)


def test_kv_budget_can_be_a_fraction_of_the_decoders_device():
    config = config_from_args(["--kv-budget-fraction", "0.25"])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert kv_budget_bytes(config, SimpleNamespace(device="cpu")) == int(host * 0.25)
    fixed = config_from_args(["--kv-budget-mb", "3"])
    assert kv_budget_bytes(fixed, SimpleNamespace(device="cpu")) == 3 * 1024 * 1024


def test_connection_limits_have_safe_defaults_and_reach_the_server_options():
    config = config_from_args([])
    public = dict(server_options(config, public=True))
    assert public["grpc.max_concurrent_streams"] == 100
    assert public["grpc.keepalive_permit_without_calls"] == 0
    assert public["grpc.http2.min_recv_ping_interval_without_data_ms"] == 60_000
    assert public["grpc.http2.max_ping_strikes"] == 2
    assert public["grpc.keepalive_time_ms"] == 120_000
    assert public["grpc.keepalive_timeout_ms"] == 20_000
    assert public["grpc.max_connection_age_ms"] == 30 * 60_000
    assert public["grpc.max_connection_age_grace_ms"] == 5 * 60_000
    # the control listener's long WatchMemory streams are not aged out
    assert "grpc.max_connection_age_ms" not in dict(server_options(config, public=False))
    tuned = dict(server_options(config_from_args(
        ["--max-concurrent-streams", "8", "--keepalive-permit-without-calls",
         "--max-connection-age", "0"]), public=True))
    assert tuned["grpc.max_concurrent_streams"] == 8
    assert tuned["grpc.keepalive_permit_without_calls"] == 1
    assert "grpc.max_connection_age_ms" not in tuned


def test_environment_sets_the_transport_flags(monkeypatch, tmp_path):
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("pem")
    monkeypatch.setenv("AUTOGLM_TLS_CERT", str(tmp_path / "cert.pem"))
    monkeypatch.setenv("AUTOGLM_TLS_KEY", str(tmp_path / "key.pem"))
    monkeypatch.setenv("AUTOGLM_MAX_CONCURRENT_STREAMS", "7")
    monkeypatch.setenv("AUTOGLM_CONTROL_INSECURE", "1")
    config = config_from_args(["--control-tls-client-ca", str(tmp_path / "ca.pem")])
    assert config.max_concurrent_streams == 7
    assert config.control_insecure
    assert config.public_tls == TlsFiles(tmp_path / "cert.pem", tmp_path / "key.pem")
    # the control listener defaults to the public certificate, with its own client CA
    assert config.control_tls == TlsFiles(tmp_path / "cert.pem", tmp_path / "key.pem",
                                          tmp_path / "ca.pem")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "{ca}"], "--tls-client-ca needs --tls-cert"),
        (["--control-tls-client-ca", "{ca}"], "--control-tls-client-ca needs"),
        (["--control-tcp", "127.0.0.1:1"], "--control-token"),
    ],
)
def test_tls_flags_are_checked_together(argv, fragment, tmp_path):
    for name in ("cert.pem", "ca.pem"):
        (tmp_path / name).write_text("pem")
    argv = [a.format(cert=tmp_path / "cert.pem", ca=tmp_path / "ca.pem") for a in argv]
    with pytest.raises(ValueError, match=fragment):
        config_from_args(argv)


def test_tcp_control_starts_with_tls_or_an_explicit_insecure_flag(tmp_path):
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("pem")
    tcp = ["--control-tcp", "127.0.0.1:1", "--control-token", "t"]
    tls = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    assert config_from_args([*tcp, *tls]).control_tls is not None
    assert config_from_args([*tcp, "--control-insecure"]).control_tls is None
