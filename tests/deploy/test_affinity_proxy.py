"""deploy/nginx/autoglm-affinity.conf on a real nginx in front of two real replicas.

Every turn of a session (x-session-id, sent by the Python client) lands on one replica
and reuses its KV cache; requests without a session id spread over both. When that
replica stops (SIGTERM, waited for: no request is in flight at the stop, so no client
retry is needed), the session continues on the other replica with a full prefill and no
failed request: nginx skips the refused replica (grpc_next_upstream error).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from autoglm_client import InferenceClient, Sampling, assistant, user
from autoglm_client.results import Final, TextDelta

from tests.conftest import REPO, ServerProcess, health_status, start_server, wait_until_serving
from tests.deploy.processes import NOT_UP_YET, free_port, http_get
from tests.support.polling import wait_until

TEMPLATE = REPO / "deploy" / "nginx" / "autoglm-affinity.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
SAMPLING = Sampling(max_new_tokens=4, min_new_tokens=2, temperature=0)

pytestmark = pytest.mark.skipif(NGINX is None, reason="no nginx (apt-get install nginx-light)")


def nginx_config(listen_port: int, replicas: list[ServerProcess], prefix: Path) -> str:
    """The shipped template with the test's ports, inside a main config rooted at prefix."""
    site = TEMPLATE.read_text()
    upstream_lines = re.findall(r"^\s*server \S+:50051 .*;$", site, re.M)
    assert len(upstream_lines) == 2, "the template lists two replicas"
    for line, replica in zip(upstream_lines, replicas, strict=True):
        site = site.replace(line, re.sub(r"\S+:50051", replica.target, line))
    site = site.replace("listen 50051 http2;", f"listen 127.0.0.1:{listen_port} http2;")
    temp_paths = "\n".join(f"    {kind}_temp_path {prefix}/{kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the prefix
    return (f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log info;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n    log_format affinity '$http_x_session_id|$upstream_addr|$uri';\n"
            f"    access_log {prefix}/access.log affinity;\n{temp_paths}\n{site}\n}}\n")


@pytest.fixture
def replicas(tiny_bundle, tmp_path) -> Iterator[list[ServerProcess]]:
    servers = [start_server(tmp_path / name, tiny_bundle, wait=False) for name in ("a", "b")]
    try:
        for server in servers:
            wait_until_serving(server, server.log_path.parent / "port.json", 180)
        yield servers
    finally:
        for server in servers:
            server.terminate()


@pytest.fixture
def prefix(tmp_path) -> Path:
    return tmp_path / "nginx"


def access_log(prefix: Path) -> list[list[str]]:
    """Per request: x-session-id as nginx saw it ("-" when absent), upstream(s), uri."""
    return [line.split("|") for line in (prefix / "access.log").read_text().splitlines()]


def generate_entries(prefix: Path, count: int) -> list[list[str]]:
    """The access log's Generate lines, once there are `count` (nginx writes a line just
    after the response has gone out, so the client can be a moment ahead of it)."""
    def entries() -> list[list[str]]:
        return [e for e in access_log(prefix) if e[2].endswith("/Generate")]

    wait_until(lambda: len(entries()) >= count, 30, f"{count} Generate lines in nginx's access log",
               ignoring=NOT_UP_YET)
    return entries()


@pytest.fixture
def proxy(replicas, prefix) -> Iterator[str]:
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(port, replicas, prefix))
    check = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(conf)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is None and health_status(target) == 1, 30, "nginx up",
                   ignoring=NOT_UP_YET)
        yield target
    finally:
        process.terminate()
        process.wait(10)


def served_by(replicas: list[ServerProcess], request_id: str) -> list[ServerProcess]:
    return [r for r in replicas
            if any(line.get("request_id") == request_id and line.get("event") == "rpc_finished"
                   for line in r.log_lines())]


def turn(client: InferenceClient, conversation, session: str, request_id: str):
    """One streamed turn: the reply text and its Final."""
    text, final = "", None
    for event in client.stream(conversation, SAMPLING, session_id=session,
                               request_id=request_id):
        match event:
            case TextDelta(text=delta):
                text += delta
            case Final():
                final = event
    return text, final


def test_requests_without_a_session_spread_over_both_replicas(replicas, proxy):
    with InferenceClient(proxy, timeout=30) as client:
        for _ in range(20):
            client.count_tokens([user("hello")])
    counts = [sum(1 for line in r.log_lines() if line.get("event") == "rpc_finished"
                  and line.get("rpc", "").endswith("CountTokens")) for r in replicas]
    assert all(count > 0 for count in counts), counts


def test_a_session_sticks_to_one_replica_and_moves_when_it_stops(replicas, proxy, prefix):
    session = "affinity-session-1"
    conversation = [user("Tell me about the weather in Beijing today.")]
    with InferenceClient(proxy, timeout=60) as client:
        reply, first = turn(client, conversation, session, "turn-1")
        [home] = served_by(replicas, "turn-1")
        conversation += [assistant(reply), user("And tomorrow?")]
        reply, second = turn(client, conversation, session, "turn-2")
        assert served_by(replicas, "turn-2") == [home]
        # the client sent the session id as metadata, and nginx hashed it
        generates = generate_entries(prefix, 2)
        assert [entry[:2] for entry in generates] == [[session, home.target]] * 2
        assert first.usage.cached_prompt_tokens == 0
        assert second.usage.cached_prompt_tokens > 0  # the session's KV cache was there

        assert home.terminate() == 0  # drained and gone; nothing in flight
        [other] = [r for r in replicas if r is not home]
        conversation += [assistant(reply), user("And the day after?")]
        reply, third = turn(client, conversation, session, "turn-3")  # no error raised
        assert served_by(replicas, "turn-3") == [other]
        assert third.usage.cached_prompt_tokens == 0  # a full prefill on the new replica
        # nginx tried the session's replica, found it refusing, and went on to the other
        upstreams = [e[1] for e in generate_entries(prefix, 3)]
        assert upstreams[2] == f"{home.target}, {other.target}"

        conversation += [assistant(reply), user("Thanks.")]
        _, fourth = turn(client, conversation, session, "turn-4")
        assert served_by(replicas, "turn-4") == [other]
        assert fourth.usage.cached_prompt_tokens > 0


def test_the_gateway_forwards_the_session_id_to_the_proxy(replicas, proxy, prefix, tmp_path):
    port = free_port()
    log = (tmp_path / "gateway.log").open("w")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--host", "127.0.0.1",
         "--port", str(port), "--grpc-target", proxy],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_get(f"{base}/health")[0] == 200, 60, "gateway /health 200",
                   ignoring=NOT_UP_YET)
        body = {"model": "autoglm-phone-9b", "max_tokens": 2, "session_id": "via-gateway",
                "messages": [{"role": "user", "content": "hello"}]}
        for _ in range(2):
            request = urllib.request.Request(
                f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as reply:
                assert reply.status == 200
    finally:
        gateway.terminate()
        gateway.wait(30)
        log.close()
    generates = generate_entries(prefix, 2)
    assert [e[0] for e in generates] == ["via-gateway"] * 2
    assert generates[0][1] == generates[1][1]
