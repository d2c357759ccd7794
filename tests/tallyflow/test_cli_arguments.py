"""Issue 23 items 2 and 5 at the command line: a typo in a period, tenant, customer, reason,
destination or time is one line and exit code 2 for every command taking one (checked before
the brokers are asked); `tallyflow config` prints TALLYFLOW_* variables and ends quietly when
its reader goes (`| head`); `generate --help` and `api --help` say what they do; the package
metadata's license is an SPDX expression."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from runtime.settings import Settings, load_settings, to_env
from schemas.errors import TallyflowError
from tests.support.events import CATALOG
from tests.support.flows import write_catalog

ROOT = Path(__file__).resolve().parents[2]
ASKED = "the brokers were asked"


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """`tallyflow ARGS` in this process with the test catalog; the brokers are never asked:
    a command whose arguments pass says so instead (ASKED)."""
    from tallyflow import cli as tf

    path = tmp_path / "catalog.yaml"
    write_catalog(path, CATALOG)
    monkeypatch.setenv("TALLYFLOW_CATALOG", str(path))

    def brokers(_: object) -> None:
        raise TallyflowError(ASKED)

    monkeypatch.setattr(tf.kafka, "ensure_reachable", brokers)

    def run(*argv: str) -> tuple[int, list[str]]:
        rc = tf.main(list(argv))
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        return rc, err

    return run


@pytest.mark.parametrize(
    "argv, line",
    [
        (["replay", "--period", "2026-13"], "--period '2026-13': not a billing period; write YYYY-MM"),
        (["replay", "--period", "banana"], "--period 'banana': not a billing period; write YYYY-MM"),
        (["replay", "--period", "2026-11", "--tenant", "acmee"], "--tenant 'acmee': no such tenant in the catalog; did you mean 'acme'?"),
        (
            ["replay", "--period", "2026-11", "--period", "2026-11-05"],
            "--period '2026-11-05': the catalog's plans bill by month, not by day",
        ),
        (["replay", "--period", "2026-11", "--start-offsets", "0=12"], "--start-offsets '0=12': write partition:offset pairs"),
        (["invoice", "--period", "2026-13"], "--period '2026-13': not a billing period; write YYYY-MM"),
        (
            ["invoice", "--period", "2026-11", "--customer", "ERP-7"],
            "--customer 'ERP-7': no tenant in the catalog has that erp_customer_id",
        ),
        (["dlq", "--reason", "unknown_tenat"], "--reason 'unknown_tenat': not one of invalid_json, schema, unknown_tenant"),
        (["dlq", "--redrive", "--reason", "too_late"], "--redrive --reason too_late: they would be too late again"),
        (
            ["exceptions", "--destination", "ERP"],
            "--destination 'ERP': not one of erp, erp-credits, crm, success, crm-status, erp-status, review; did you mean 'erp'?",
        ),
        (["generate", "--start", "banana"], "--start 'banana': not an RFC 3339 time"),
        (["generate", "--start", "2026-10-31T12:00"], "--start '2026-10-31T12:00': no time zone; add Z or an offset"),
    ],
)
def test_a_typo_is_one_line_and_exit_code_2_before_the_brokers_are_asked(cli, argv: list[str], line: str) -> None:
    rc, err = cli(*argv)
    assert (rc, len(err)) == (2, 1), err
    assert err[0].startswith(f"tallyflow: {line}"), err[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "--period", "2026-11", "--tenant", "acme", "--tenant", "bolt"],
        ["replay", "--period", "2026-10", "--period", "2026-11", "--start-offsets", "0:12,1:0"],
        ["invoice", "--period", "2026-11", "--customer", "ERP-1"],
        ["dlq", "--reason", "unknown_tenant", "--tenant", "newco"],  # not onboarded yet: judged once its dead letters are read
        ["exceptions", "--destination", "crm"],
        ["reconcile"],
    ],
)
def test_what_is_meant_passes_the_checks(cli, argv: list[str]) -> None:
    assert cli(*argv) == (2, [f"tallyflow: {ASKED}"])


def test_replay_with_a_typo_ends_with_one_line_against_a_real_broker(small: Settings) -> None:
    """The issue's own report: `replay --period 2026-13` answered rc 0, "replayed 0 events"."""
    env = {**os.environ, **to_env(small)}
    for args, why in (
        (["--period", "2026-13"], "--period '2026-13': not a billing period"),
        (["--period", "2026-03", "--tenant", "ghost"], "--tenant 'ghost': no such tenant in the catalog"),
    ):
        p = subprocess.run([sys.executable, "-m", "tallyflow.cli", "replay", *args], env=env, capture_output=True, timeout=120, check=False)
        err = [ln for ln in p.stderr.decode().splitlines() if ln.strip()]
        assert (p.returncode, p.stdout) == (2, b""), (p.returncode, p.stdout.decode()[-500:], err[-5:])
        assert len(err) == 1 and err[0].startswith(f"tallyflow: {why}"), err[-5:]


# -- tallyflow config ----------------------------------------------------------------------------


def config(*args: str, env: dict[str, str] | None = None, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tallyflow.cli", "config", *args],
        env={**os.environ, **(env or {})},
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=60,
        check=False,
    )


def test_config_prints_the_variables_by_name_with_secrets_masked() -> None:
    p = config(env={"TALLYFLOW_CRM_TOKEN": "s3cret-token", "TALLYFLOW_WINDOW_SECONDS": "30", "TALLYFLOW_KAFKA_LINGER_MS": "7"})
    assert (p.returncode, p.stderr) == (0, b"")
    out = p.stdout.decode()
    lines = dict(ln.split("=", 1) for ln in out.splitlines())
    assert all(re.fullmatch(r"TALLYFLOW_[A-Z0-9_]+", name) for name in lines), out[:500]
    assert set(lines) == set(to_env(load_settings({}, kafka={"linger.ms": "7"})))  # every setting, each by the variable that sets it
    assert (lines["TALLYFLOW_WINDOW_SECONDS"], lines["TALLYFLOW_KAFKA_LINGER_MS"], lines["TALLYFLOW_CRM_TOKEN"]) == ("30.0", "7", "'***'")
    assert "s3cret" not in out
    machine = config("--json")
    assert machine.returncode == 0 and machine.stdout.lstrip().startswith(b"{")  # the JSON by setting name, for machines


def test_config_ends_quietly_when_its_reader_has_gone() -> None:
    """`tallyflow config | head`: no traceback. Deterministic: the pipe's reader is closed before it starts."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = config(stdout=w)
    finally:
        os.close(w)
    assert p.stderr == b"", p.stderr.decode()[-2000:]
    assert p.returncode == 141  # as a tool ended by SIGPIPE
    shell = subprocess.run(
        f"{sys.executable} -m tallyflow.cli config | head -2", shell=True, capture_output=True, timeout=60, check=False, env=os.environ
    )
    assert (shell.returncode, shell.stderr) == (0, b"")
    assert [ln.split("=")[0] for ln in shell.stdout.decode().splitlines()] == ["TALLYFLOW_BROKERS", "TALLYFLOW_BATCH_SIZE"]


# -- help and packaging --------------------------------------------------------------------------


def help_of(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    from tallyflow.cli import main

    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_generate_and_api_help_say_what_they_do(capsys: pytest.CaptureFixture[str]) -> None:
    gen = help_of("generate", capsys)
    for said in (
        "Produce synthetic usage events to the input topic",
        "keyed by tenant",
        "dead letter",
        "same --seed makes the same traffic",
    ):
        assert said in gen, said
    api = help_of("api", capsys)
    for said in (
        "POST /v1/events",
        "GET /v1/tenants/{t}/usage",
        "?period=YYYY-MM&meter=M",
        "GET /v1/tenants/{t}/entitlements/{meter}?period=",
        "has_access, included, used, remaining, overage",
        "GET /tenants/{t}?period=&tz=+01:00 the usage page for people",
        "spend alerts",
        "/openapi.json",
        "TALLYFLOW_API_TOKENS_FILE",
    ):
        assert said in api, said


def test_the_license_is_an_spdx_expression() -> None:
    """setuptools warns that `license = {text = ...}` stops building after 2027-02-18 (PEP 639)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))  # PEP 639: the expression alone
