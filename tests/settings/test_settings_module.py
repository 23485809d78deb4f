"""autoglm_settings: one dataclass gives flags, environment variables, the table and the
validated value."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from autoglm_settings import (
    MIB,
    SettingError,
    add_arguments,
    build,
    check_choices,
    deprecated_names,
    from_environment,
    load,
    markdown_table,
    replace_block,
    section,
    setting,
)

PREFIX = "TEST_"


@dataclass(frozen=True)
class Limits:
    budget_bytes: int = setting(1024 * 1024, name="budget_mb", unit=MIB, help="budget")
    cache: bool = setting(True, help="cache results")


@dataclass(frozen=True)
class Network:
    port: int = setting(80, aliases=("--listen",), help="port")
    peers: tuple[str, ...] = setting((), help="peers")
    mode: str = setting("fast", choices=("fast", "safe"), help="mode")

    def __post_init__(self) -> None:
        check_choices(self, "network")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"network.port {self.port} is out of range")


@dataclass(frozen=True)
class Example:
    cert: Path | None = setting(None, help="certificate")
    limits: Limits = section(Limits, named=False)
    network: Network = section(Network)


def parse(argv: list[str], environ: dict[str, str] | None = None) -> Example:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example, PREFIX)
    return load(Example, PREFIX, parser.parse_args(argv), environ or {})


def test_defaults_environment_and_flags_layer_with_the_flag_winning():
    assert parse([]) == Example()
    environ = {"TEST_NETWORK_PORT": "8080", "TEST_BUDGET_MB": "2", "TEST_CERT": "c.pem"}
    config = parse(["--network-port", "9090"], environ)
    assert config.network.port == 9090
    assert config.limits.budget_bytes == 2 * 1024 * 1024
    assert config.cert == Path("c.pem")
    assert parse(["--listen", "81"]).network.port == 81


def test_booleans_have_negative_flags_and_variables():
    assert parse(["--no-cache"]).limits.cache is False
    assert parse([], {"TEST_NO_CACHE": "1"}).limits.cache is False
    assert parse(["--cache"], {"TEST_NO_CACHE": "1"}).limits.cache is True
    assert parse([], {"TEST_CACHE": "off"}).limits.cache is False
    with pytest.raises(SettingError, match="TEST_CACHE and TEST_NO_CACHE both set cache"):
        parse([], {"TEST_CACHE": "1", "TEST_NO_CACHE": "1"})


def test_lists_come_from_repeated_flags_commas_or_the_environment():
    assert parse(["--network-peers", "a", "--network-peers", "b,c"]).network.peers == (
        "a", "b", "c")
    assert parse([], {"TEST_NETWORK_PEERS": "x, y"}).network.peers == ("x", "y")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TEST_NETWORK_PORT": "eighty"}, "network.port must be an integer, got 'eighty'"),
        ({"TEST_BUDGET_MB": "lots"}, "budget_bytes must be a number of MiB, got 'lots'"),
        ({"TEST_CACHE": "perhaps"}, "cache must be a boolean"),
        ({"TEST_NETWORK_PORT": "70000"}, "network.port 70000 is out of range"),
        ({"TEST_NETWORK_MODE": "slow"}, r"network.mode must be one of \('fast', 'safe'\)"),
    ],
)
def test_bad_environment_values_name_the_key(environ, message):
    with pytest.raises(ValueError, match=message):
        parse([], environ)


def test_bad_flags_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        parse(["--network-port", "eighty"])
    assert "argument --listen/--network-port: network.port must be an integer" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        parse(["--network-mode", "slow"])
    assert "invalid choice" in capsys.readouterr().err


def test_strict_environment_rejects_unknown_names_but_the_ignored():
    environ = {"TEST_NETWORK_PROT": "1", "TEST_CONFIG": "x"}
    assert from_environment(Example, environ, PREFIX) == {}
    with pytest.raises(SettingError, match="unknown environment variable TEST_NETWORK_PROT"):
        from_environment(Example, environ, PREFIX, strict=True, ignore=("TEST_CONFIG",))
    assert from_environment(Example, {"TEST_CONFIG": "x"}, PREFIX, strict=True,
                            ignore=("TEST_CONFIG",)) == {}


def test_a_file_mapping_is_typed_and_unknown_keys_are_errors():
    assert build(Example, {"network": {"port": 8000, "peers": ["p"]}}).network.peers == ("p",)
    with pytest.raises(SettingError, match=r"unknown config key\(s\) in \[network\]: prot"):
        build(Example, {"network": {"prot": 1}})
    with pytest.raises(SettingError, match=r"network\.port must be an integer, got 1\.5"):
        build(Example, {"network": {"port": 1.5}})


def test_help_and_table_name_every_flag_variable_and_default():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example, PREFIX)
    text = parser.format_help()
    assert "--listen N, --network-port N" in text
    assert "[TEST_NETWORK_PORT; default 80]" in text
    assert "--budget-mb MiB" in text and "[TEST_BUDGET_MB; default 1]" in text
    table = markdown_table(Example, PREFIX, file_keys=True)
    assert "| `--cache` / `--no-cache` | `TEST_CACHE` | `cache` | on | cache results |" in table
    assert "| `--network-mode` | `TEST_NETWORK_MODE` | `network.mode` | fast | mode " \
           "(`fast`, `safe`) |" in table


def test_a_block_between_markers_is_replaced_and_missing_markers_are_an_error():
    text = "a\n<!-- generated: t -->\nold\n<!-- end generated: t -->\nb\n"
    assert replace_block(text, "t", "new\n") == (
        "a\n<!-- generated: t -->\nnew\n<!-- end generated: t -->\nb\n")
    with pytest.raises(ValueError, match="markers for 'u' are missing"):
        replace_block(text, "u", "new\n")


@dataclass(frozen=True)
class Renamed:
    target: str = setting("here", deprecated_env=("OLD_TARGET", "TEST_DESTINATION"),
                          help="target")
    token: str | None = setting(None, env_only=True, help="secret")


def test_a_deprecated_name_is_read_where_the_current_one_is_unset():
    assert from_environment(Renamed, {"OLD_TARGET": "old"}, PREFIX) == {"target": "old"}
    assert from_environment(Renamed, {"OLD_TARGET": "old", "TEST_TARGET": "new"},
                            PREFIX) == {"target": "new"}
    assert deprecated_names(Renamed, PREFIX) == {"OLD_TARGET": "TEST_TARGET",
                                                 "TEST_DESTINATION": "TEST_TARGET"}
    # a deprecated name under the prefix is not an unknown one
    assert from_environment(Renamed, {"TEST_DESTINATION": "old"}, PREFIX,
                            strict=True) == {"target": "old"}


def test_an_environment_only_setting_has_no_flag_and_says_so_in_the_table():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Renamed, PREFIX)
    assert "--token" not in parser.format_help()
    assert from_environment(Renamed, {"TEST_TOKEN": "s"}, PREFIX) == {"token": "s"}
    table = markdown_table(Renamed, PREFIX)
    assert "| (environment only) | `TEST_TOKEN` |  | secret |" in table
    assert ("| `--target` | `TEST_TARGET` (deprecated: `OLD_TARGET`, `TEST_DESTINATION`) | here "
            "| target |") in table
