"""deploy/run_autoglm_server.sh on the tiny bundle: three real processes up, then SIGTERM.

The script starts the service, the memory daemon (host probe: no GPU here) and the
gateway on ephemeral ports, waits for SERVING, and on SIGTERM drains the service,
stops the other two and exits 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from tests.conftest import REPO, health_status
from tests.deploy.processes import NOT_UP_YET, free_port, http_get
from tests.support.polling import wait_until

SCRIPT = REPO / "deploy" / "run_autoglm_server.sh"
SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING


def metric_total(text: str, name: str) -> float:
    return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_starts_all_three_and_stops_them_cleanly_on_sigterm(tiny_bundle, tmp_path):
    gateway_port, memd_metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "AUTOGLM_BIN": str(Path(sys.executable).parent),
        "AUTOGLM_PORT": "0", "AUTOGLM_HOST": "127.0.0.1", "AUTOGLM_METRICS_PORT": "0",
        "AUTOGLM_RUN_DIR": str(tmp_path), "AUTOGLM_GRACE_PERIOD": "3",
        "AUTOGLM_START_TIMEOUT": "180",
        "AUTOGLM_GATEWAY_PORT": str(gateway_port),
        "AUTOGLM_MEMD_DAEMON_METRICS_PORT": str(memd_metrics_port),
        "AUTOGLM_MEMD_DAEMON_POLL_INTERVAL_MAX_SECONDS": "0.5",
        "AUTOGLM_MEMD_DAEMON_PROBE": "host",  # the script would pick nvml on a GPU host
    }
    log_path = tmp_path / "script.log"
    with log_path.open("w") as log:
        script = subprocess.Popen(
            [str(SCRIPT), "--model-dir", str(tiny_bundle), "--log-format", "json"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        port_file = tmp_path / "autoglm-port.json"
        port = wait_until(lambda: json.loads(port_file.read_text())["serving"] and
                          json.loads(port_file.read_text())["port"], 180,
                          "port file serving: true", ignoring=NOT_UP_YET)
        target = f"127.0.0.1:{port}"
        assert health_status(target) == SERVING
        assert (tmp_path / "autoglm-control.sock").is_socket()
        wait_until(lambda: http_get(f"http://127.0.0.1:{gateway_port}/health")[0] == 200,
                   60, "gateway /health 200", ignoring=NOT_UP_YET)
        # the daemon measured the service and read its status through the control socket
        memd_metrics = f"http://127.0.0.1:{memd_metrics_port}/metrics"
        wait_until(lambda: metric_total(http_get(memd_metrics)[1], "memd_status_reads_total") > 0,
                   60, "memd read the service status", ignoring=NOT_UP_YET)
        assert metric_total(http_get(memd_metrics)[1], "memd_device_used_bytes") > 0

        children = psutil.Process(script.pid).children(recursive=True)
        names = " ".join(" ".join(child.cmdline()) for child in children)
        for program in ("autoglm-server", "autoglm-memd", "autoglm-gateway"):
            assert program in names

        script.send_signal(signal.SIGTERM)
        assert script.wait(60) == 0, log_path.read_text()[-3000:]
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
        assert not (tmp_path / "autoglm-control.sock").exists()
        text = log_path.read_text()
        assert '"event": "stopped"' in text  # the service drained and stopped itself
        assert "stopped (service exit 0)" in text
    finally:
        if script.poll() is None:
            for child in psutil.Process(script.pid).children(recursive=True):
                child.kill()
            script.kill()
            script.wait()


def test_a_service_that_cannot_start_fails_the_script(tmp_path):
    env = {**os.environ, "AUTOGLM_BIN": str(Path(sys.executable).parent), "AUTOGLM_PORT": "0",
           "AUTOGLM_HOST": "127.0.0.1", "AUTOGLM_METRICS_PORT": "0",
           "AUTOGLM_RUN_DIR": str(tmp_path), "AUTOGLM_GATEWAY_PORT": str(free_port())}
    result = subprocess.run([str(SCRIPT), "--model-dir", str(tmp_path / "no-such-model")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "the service exited before serving" in result.stderr
