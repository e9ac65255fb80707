"""What a person meets first: ``-h``, ``--version``, help that fits a terminal, and a warning
when ``bench`` timings compete with other work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import monarchify
from monarchify import bench
from monarchify.cli.app import RICH_HELP_MIN_COLUMNS, help_markup_mode, main
from tests import test_bench_cli
from tests.test_bench_cli import QUICK

fake_clock = test_bench_cli.fake_clock  # the fixture, shared


def run(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("columns", ["80", "160"])
@pytest.mark.parametrize("command", [(), ("convert",), ("bench",), ("bench", "layer")], ids=" ".join)
def test_dash_h_is_help(capsys, monkeypatch, columns, command):
    monkeypatch.setenv("COLUMNS", columns)
    code_long, long_help, _ = run(capsys, *command, "--help")
    code_short, short_help, _ = run(capsys, *command, "-h")
    assert code_long == code_short == 0
    assert "Usage: monarchify" in long_help and short_help == long_help


@pytest.mark.parametrize("columns", ["80", "160"])
@pytest.mark.parametrize("command", [(), ("bench",)], ids=" ".join)
def test_a_bare_group_prints_its_whole_help(capsys, monkeypatch, columns, command):
    monkeypatch.setenv("COLUMNS", columns)
    code, out, err = run(capsys, *command)
    _, help_text, _ = run(capsys, *command, "--help")
    assert code == 2 and out.rstrip() == help_text.rstrip() and "Commands" in out and not err


def test_version_prints_the_package_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0 and out == f"monarchify {monarchify.__version__}\n" and not err


def test_version_and_help_import_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "from monarchify.cli.app import main\n"
        "assert main(['--version']) == 0 and main(['convert', '--help']) == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("columns", ["80", "100", "120"])
def test_help_never_cuts_an_option_name(capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)
    code, out, _ = run(capsys, "convert", "--help")
    assert code == 0
    for name in ("--allow-structural-zeros", "--calibration-samples", "--output-order", "--only-if-faster"):
        assert name in out, (name, out)
    assert "…" not in out
    # Everything fits but the verbatim example commands, kept whole for copying.
    prose = [line for line in out.splitlines() if not line.lstrip().startswith("monarchify ")]
    assert max(len(line) for line in prose) <= int(columns)


def test_help_layout_follows_the_width():
    assert help_markup_mode(80) is None and help_markup_mode(RICH_HELP_MIN_COLUMNS - 1) is None
    assert help_markup_mode(RICH_HELP_MIN_COLUMNS) == "rich" and help_markup_mode(200) == "rich"


@pytest.mark.parametrize(
    "load,threads,busy",
    [
        (None, 1, False),
        (0.0, 1, False),
        (1.0, 1, False),
        (1.01, 1, True),
        (3.5, 1, True),
        (1.5, 2, False),
        (2.0, 2, False),
        (2.5, 2, True),
        (7.9, 8, False),
        (8.1, 8, True),
        (0.5, 0, False),  # no thread count: still one thread's worth of load is expected
        (1.2, 0, True),
    ],
)
def test_is_busy(load, threads, busy):
    assert bench.is_busy(load, threads) is busy


def test_thread_counts_are_spelled_right():
    assert bench.plural(1, "thread") == "1 thread" and bench.plural(2, "thread") == "2 threads"
    assert bench.plural(0, "core") == "0 cores"


LAYER = ("bench", "layer", "--d-in", "16", "--d-out", "16", "--nblocks", "2", "--tokens", "4", "--device", "cpu",
         "--threads", "1", *QUICK)


def test_bench_warns_on_a_busy_machine(capsys, monkeypatch, fake_clock):
    monkeypatch.setattr(bench, "load_average", lambda: 5.25)
    code, out, err = run(capsys, *LAYER, "--json")
    assert code == 0, err
    env = json.loads(out)["environment"]
    assert env["busy"] is True and env["load_avg_1min"] == 5.25 and env["threads"] == 1
    assert "1 thread" in env["device_name"] and "1 threads" not in env["device_name"]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "5.25" in warnings[0] and "1 thread:" in warnings[0] and "not be trustworthy" in warnings[0]
    code, out, err = run(capsys, *LAYER)  # the table for people warns the same way, on stderr
    assert code == 0 and "not be trustworthy" in err and "not be trustworthy" not in out


def test_bench_is_quiet_on_an_idle_machine(capsys, monkeypatch, fake_clock):
    monkeypatch.setattr(bench, "load_average", lambda: 0.25)
    code, out, err = run(capsys, *LAYER, "--json")
    assert code == 0, err
    assert json.loads(out)["environment"]["busy"] is False and "warning" not in err


@pytest.mark.parametrize(
    "args",
    [
        ("convert", "{file}", "-b", "4", "-o", "{tmp}/out"),
        ("convert", "{tmp}/missing", "-b", "4", "-o", "{tmp}/out"),
        ("densify", "{file}", "-o", "{tmp}/out"),
        ("report", "{file}"),
        ("heal", "{file}", "--teacher", "{file}", "--text", "{tmp}/missing.txt", "-o", "{tmp}/out"),
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_a_failing_command_prints_its_error_line_first(capsys, tmp_path, args):
    """Nothing above the ``Error:`` line: a progress bar that a pipe never shows must not leave
    an empty line behind it either."""
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"")
    code, _, err = run(capsys, *(a.format(file=file, tmp=tmp_path) for a in args))
    assert code == 1 and err.startswith("Error:") and len(err.splitlines()) == 1, repr(err)


def test_a_failing_command_piped_prints_its_error_line_first(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "monarchify.cli.app", "convert", str(tmp_path / "missing"), "-b", "4", "-o", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 1 and run.stderr.startswith("Error: model folder"), repr(run.stderr)
