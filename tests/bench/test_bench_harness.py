"""The benchmarks' own plumbing (fast, no model): table layout, statistics, JSON output."""

from __future__ import annotations

import json

from tests.bench.harness import (
    StreamResult,
    markdown_table,
    percentile,
    render_table,
    report,
    unique_tag,
)


def test_table_columns_align():
    table = render_table(["system", "tok/s"], [["a", "1.5"], ["longer name", "123.4"]])
    header, rule, first, second = table.splitlines()
    assert rule == "-" * len("longer name") + "  " + "-" * len("123.4")
    assert first == "a" + " " * 10 + "  " + "  1.5"
    assert second.endswith("123.4") and len(second) == len(rule)
    assert header.startswith("system")


def test_report_writes_json_to_bench_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    path = report("demo", "demo table", ["k", "v"], [["x", "1"]], {"raw": [1, 2]}, ["a note"])
    assert path == tmp_path / "demo.json"
    data = json.loads(path.read_text())
    assert data["rows"] == [["x", "1"]] and data["raw"] == [1, 2] and data["notes"] == ["a note"]
    assert "demo table" in capsys.readouterr().out


def test_rates_and_percentiles():
    result = StreamResult(ttft_s=0.5, total_s=2.5, completion_tokens=41, prompt_tokens=10)
    assert result.tokens_per_s == 41 / 2.5
    assert result.decode_tokens_per_s == 40 / 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert unique_tag() != unique_tag()


def test_markdown_table_aligns_numbers_right():
    table = markdown_table(["system", "tok/s"], [["a", "1.5"]])
    assert table.splitlines() == ["| system | tok/s |", "|:--|--:|", "| a | 1.5 |"]
