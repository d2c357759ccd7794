"""Operator mistakes get one clear line: an unreachable broker stops every command that needs
it within seconds, naming TALLYFLOW_BROKERS and the address tried."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

COMMANDS = [["rate"], ["deliver", "alerts"], ["deliver", "erp"], ["topics"], ["dlq"], ["reconcile"], ["generate", "--total", "10"]]


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
