"""Operator mistakes get one clear line: an unreachable broker stops every command that needs
it within seconds, naming TALLYFLOW_BROKERS and the address tried."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

COMMANDS = [["rate"], ["deliver", "alerts"], ["deliver", "erp"], ["topics"], ["dlq"], ["reconcile"], ["generate", "--total", "10"]]


@pytest.mark.integration
def test_an_unreachable_broker_is_one_line_for_every_command():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TALLYFLOW_BROKERS": f"127.0.0.1:{port}"}
    t0 = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, "-m", "tallyflow.cli", *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for cmd in COMMANDS
    ]
    for cmd, p in zip(COMMANDS, procs, strict=True):
        _, err = p.communicate(timeout=30)
        lines = [ln for ln in err.decode().splitlines() if ln.strip()]
        assert p.returncode == 2, (cmd, p.returncode, err.decode()[-2000:])
        assert len(lines) == 1, (cmd, lines[:5])
        assert "TALLYFLOW_BROKERS" in lines[0] and f"127.0.0.1:{port}" in lines[0]
    assert time.monotonic() - t0 < 15 + 5  # commands run side by side; each stops within ~10 s


def test_every_subcommand_explains_its_options(capsys):
    """A newcomer's `--help`: every option of every subcommand has a one-line explanation,
    and the help prints."""
    from tallyflow.cli import main, parser

    subs = parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"rate", "deliver", "demo", "bench", "reconcile", "replay", "dlq", "generate", "topics"} <= set(subs)
    for name, sub in subs.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"tallyflow {name}: {action.option_strings or action.dest} has no explanation"
        try:
            main([name, "--help"])
        except SystemExit as e:
            assert e.code == 0
        assert f"usage: tallyflow {name}" in capsys.readouterr().out


def test_rate_help_is_ours_not_a_dump_of_settings(capsys):
    from tallyflow.cli import main

    try:
        main(["rate", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "bytewax.run" in out and "-w N" in out and "{" not in out.split("\n", 1)[0]


@pytest.mark.parametrize(
    "argv, env",
    [
        (["-m", "tallyflow.cli", "rate", "-w", "2"], {}),
        (["-m", "tallyflow.cli", "deliver", "erp", "--workers-per-process=3"], {}),
        (["-m", "bytewax.run", "dataflows.rating:get_flow()", "-w2"], {}),
        (["-m", "bytewax.run", "dataflows.alerts:get_flow()"], {"BYTEWAX_WORKERS_PER_PROCESS": "2"}),
    ],
)
def test_worker_threads_are_refused_with_one_line_naming_processes(argv: list[str], env: dict[str, str]) -> None:
    """Worker threads of one process share the GIL and every object the dataflow is handed
    (issue 18: `-w 2` lost events): refused before anything runs, whichever way the flow is started."""
    p = subprocess.run([sys.executable, *argv], env={**os.environ, **env}, capture_output=True, timeout=60, check=False)
    lines = [ln for ln in p.stderr.decode().splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr.decode()[-2000:])
    assert len(lines) == 1 and "not supported" in lines[0] and "-i/-a" in lines[0], lines[:5]


def test_worker_threads_are_read_as_bytewax_reads_them() -> None:
    from runtime.process import worker_threads

    assert worker_threads([], {}) == 1
    assert worker_threads(["-r", "x", "-w", "4"], {}) == 4
    assert worker_threads(["-w3"], {}) == 3
    assert worker_threads(["--workers-per-process=2"], {}) == 2
    assert worker_threads([], {"BYTEWAX_WORKERS_PER_PROCESS": "5"}) == 5
    assert worker_threads(["-w", "1"], {"BYTEWAX_WORKERS_PER_PROCESS": "5"}) == 1
