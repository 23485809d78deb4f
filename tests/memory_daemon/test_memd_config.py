"""Bad configuration through the real CLI entry: exit code 2 and a message naming the key."""

import textwrap
from pathlib import Path

import pytest

from memory_daemon.cli import build_parser, main, overrides_from_flags
from memory_daemon.config import ENV_PREFIX, load_config
from memory_daemon.errors import ConfigError, ExitCode


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "memd.toml"
    path.write_text(textwrap.dedent(text))
    return path


def exit_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    return stopped.value.code, capsys.readouterr().err


BAD_FILES = {
    "negative": ("[policy]\ntransition_seconds = -1\n", "policy.transition_seconds must be >= 0"),
    "zero mark": ("[policy]\nsoft_enter = 0\n", "policy.soft_enter must be a fraction"),
    "over 100%": ("[policy]\nhard_enter = 1.5\n", "policy.hard_enter must be a fraction"),
    "exit above enter": (
        "[policy]\nsoft_enter = 0.7\nsoft_exit = 0.75\n",
        "policy.soft_exit (0.75) must be below policy.soft_enter (0.7)",
    ),
    "hard below soft": (
        "[policy]\nhard_enter = 0.75\nhard_exit = 0.72\n",
        "policy.hard_enter (0.75) must be above policy.soft_enter",
    ),
    "unknown key": ("[policy]\nsoft_entr = 0.8\n", "unknown config key(s) in [policy]: soft_entr"),
    "unknown section": ("[polcy]\nsoft_enter = 0.8\n", "unknown config key(s) in the top level"),
    "not a number": ('[policy]\nsoft_enter = "high"\n', "policy.soft_enter must be a number"),
    "bool for a number": ("[daemon]\nmetrics_port = true\n", "daemon.metrics_port must be an"),
    "float for an integer": ("[policy]\nadmission_limit = 1.5\n", "must be an integer"),
    "zero poll interval": (
        "[daemon]\npoll_interval_min_seconds = 0\n",
        "daemon.poll_interval_min_seconds must be > 0",
    ),
    "min above max poll": (
        "[daemon]\npoll_interval_min_seconds = 10\npoll_interval_max_seconds = 1\n",
        "poll_interval_max_seconds must be >=",
    ),
    "bad cooldown": (
        "[policy.cooldown_seconds]\ntrim_kv = -5\n",
        "policy.cooldown_seconds.trim_kv must be >= 0",
    ),
    "unknown probe": ('[daemon]\nprobe = "rocm"\n', "daemon.probe must be one of"),
    "tcp without token": (
        '[control]\ntarget = "127.0.0.1:5000"\n',
        "control.token is required for the TCP target",
    ),
    "unknown status source": (
        '[control]\nstatus_source = "push"\n',
        "control.status_source must be one of ('watch', 'poll'), got 'push'",
    ),
    "watch interval not below stale_after": (
        "[control]\nwatch_interval_seconds = 10\n",
        "control.watch_interval_seconds (10.0) must be below policy.stale_after_seconds (10.0)",
    ),
    "replay without trace": ('[daemon]\nprobe = "replay"\n', "replay.trace (--trace) is required"),
    "section not a table": ("policy = 3\n", "[policy] must be a table"),
    "not toml": ("[policy\n", "is not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_file_exits_2_with_a_precise_message(case, tmp_path, capsys):
    text, message = BAD_FILES[case]
    code, err = exit_of(["--config", str(write(tmp_path, text)), "--once"], capsys)
    assert code == ExitCode.BAD_CONFIG
    assert message in err


def test_missing_config_file_exits_2(tmp_path, capsys):
    code, err = exit_of(["--config", str(tmp_path / "absent.toml"), "--once"], capsys)
    assert code == ExitCode.BAD_CONFIG
    assert "cannot read config file" in err


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("POLICY_SOFT_ENTER", "abc", "policy.soft_enter must be a number"),
        ("POLICY_SOFT_ENTER", "nan", "policy.soft_enter must be finite"),
        ("DAEMON_DRY_RUN", "perhaps", "daemon.dry_run must be a boolean"),
        ("POLICY_SOFT_ENTRY", "0.8", f"unknown environment variable {ENV_PREFIX}POLICY_SOFT_ENTRY"),
    ],
)
def test_bad_environment_exits_2(name, value, message, monkeypatch, capsys):
    monkeypatch.setenv(ENV_PREFIX + name, value)
    code, err = exit_of(["--once"], capsys)
    assert code == ExitCode.BAD_CONFIG
    assert message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--poll-interval", "-1"], "daemon.poll_interval_min_seconds must be > 0"),
        (["--poll-interval", "fast"], "invalid float value"),
        (["--probe", "tpu"], "invalid choice"),
        (["--metrics-port", "70000"], "daemon.metrics_port must be in [0, 65535]"),
        (["--control", "localhost:1"], "control.token is required"),
        (["--tls-ca", "/nonexistent/ca.pem"], "control.tls_* apply to a TCP target"),
        (
            ["--control", "localhost:1", "--token", "t", "--tls-ca", "/nonexistent/ca.pem"],
            "control.tls_ca '/nonexistent/ca.pem' is not a readable file",
        ),
        (
            ["--control", "localhost:1", "--token", "t", "--tls-cert", "/nonexistent/c.pem"],
            "control.tls_cert and control.tls_key go together",
        ),
        (["--watch", "--poll-status"], "not allowed with argument"),
    ],
)
def test_bad_flags_exit_2(argv, message, capsys):
    code, err = exit_of([*argv, "--once"], capsys)
    assert code == ExitCode.BAD_CONFIG
    assert message in err


def test_sources_layer_defaults_file_environment_flags(tmp_path):
    path = write(
        tmp_path,
        """
        [policy]
        soft_enter = 0.85
        soft_exit = 0.6
        [policy.cooldown_seconds]
        trim_kv = 3
        [nvml]
        devices = ["GPU-a"]
        """,
    )
    environ = {ENV_PREFIX + "POLICY_SOFT_EXIT": "0.65", ENV_PREFIX + "NVML_DEVICES": "GPU-b,GPU-c"}
    config = load_config(path, environ, {"policy": {"soft_exit": 0.7}})
    assert config.policy.soft_enter == 0.85
    assert config.policy.soft_exit == 0.7
    assert config.policy.cooldown_seconds.trim_kv == 3
    assert config.policy.hard_enter == 0.92
    assert config.nvml.devices == ("GPU-b", "GPU-c")


@pytest.mark.parametrize(
    ("argv", "environ", "source"),
    [
        ([], {}, "watch"),
        (["--poll-status"], {}, "poll"),
        (["--watch"], {ENV_PREFIX + "CONTROL_STATUS_SOURCE": "poll"}, "watch"),
        ([], {ENV_PREFIX + "CONTROL_STATUS_SOURCE": "poll"}, "poll"),
    ],
)
def test_status_source_from_flags_and_environment(argv, environ, source):
    args = build_parser().parse_args(argv)
    assert load_config(None, environ, overrides_from_flags(args)).control.status_source == source


def test_a_slow_watch_interval_is_fine_when_polling():
    config = load_config(
        None, {}, {"control": {"status_source": "poll", "watch_interval_seconds": 30}}
    )
    assert config.control.watch_interval_seconds == 30


def test_config_path_from_the_environment(tmp_path):
    path = write(tmp_path, "[policy]\nsoft_enter = 0.9\nhard_enter = 0.95\n")
    config = load_config(None, {ENV_PREFIX + "CONFIG": str(path)})
    assert config.policy.soft_enter == 0.9


def test_example_config_is_valid_and_documents_every_key():
    example = Path(__file__).resolve().parents[2] / "deploy" / "memd.example.toml"
    config = load_config(example, {})
    assert config == load_config(None, {})
    text = example.read_text()
    for section in ("daemon", "control", "policy", "nvml", "host", "replay"):
        for key in getattr(config, section).__dataclass_fields__:
            assert f"\n{key} =" in text or f"[{section}.{key}]" in text, f"{section}.{key}"
    for key in config.policy.cooldown_seconds.__dataclass_fields__:
        assert f"\n{key} =" in text, key


def test_tls_to_the_control_port_from_flags_and_environment(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    environ = {ENV_PREFIX + "CONTROL_TOKEN": "t", ENV_PREFIX + "CONTROL_TLS_CA": str(ca)}
    config = load_config(None, environ, {"control": {"target": "localhost:1"}})
    assert config.control.tls and config.control.tls_ca == str(ca)
    assert not load_config(None, {}).control.tls


def test_config_error_is_a_domain_error_with_its_exit_code():
    with pytest.raises(ConfigError) as raised:
        load_config(None, {ENV_PREFIX + "POLICY_HARD_EXIT": "2"})
    assert raised.value.exit_code == ExitCode.BAD_CONFIG


def test_metrics_listen_on_loopback_unless_a_host_is_given():
    assert load_config(None, {}).daemon.metrics_host == "127.0.0.1"
    args = build_parser().parse_args(["--metrics-host", "0.0.0.0"])
    assert load_config(None, {}, overrides_from_flags(args)).daemon.metrics_host == "0.0.0.0"
    environ = {ENV_PREFIX + "DAEMON_METRICS_HOST": "::1"}
    assert load_config(None, environ).daemon.metrics_host == "::1"
