"""deploy/: the systemd unit passes `systemd-analyze verify`, the env example names exactly the env vars
`runner up` reads, and the exit-75 upgrade path records the offer and runs the configured command."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bencher_runner import __version__
from bencher_runner.cli.daemon import daemon_command
from bencher_runner.daemon import Daemon, DaemonSettings
from bencher_runner.daemon.update import (
    COMMAND_ENV,
    MAX_ATTEMPTS,
    UPGRADE_TIMEOUT_S,
    UpdateRecord,
    apply_pending_update,
    auto_update_allowed,
    load_record,
    record_offer,
    record_path,
)
from bencher_runner.fakeserver import FakeBencher
from bencher_runner.protocol import EXIT_UPDATE
from bencher_runner.spec.results import RunResult

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "bencher-runner.service"
ENV_EXAMPLE = ROOT / "deploy" / "runner.env.example"
INSTALL_PREFIX = "/opt/bencher-runner"
KEY = "bencher_runner_" + "a1" * 15
# BENCHER_* names the code knows that `runner up` never reads: registry credentials of `runner run`
# (the daemon gets a per-job token from the server) and the jailer (the daemon never uses one).
RUN_ONLY = {"BENCHER_RUNNER_TOKEN", "BENCHER_RUNNER_REGISTRY_PASSWORD", "BENCHER_RUNNER_JAILER"}
UNIT_ONLY = {"BENCHER_RUNNER_ARGS"}  # expanded by systemd in ExecStart=, not read by Python


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; keys may repeat, as systemd allows."""
    entries, section = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_value(key: str, section: str = "Service") -> str:
    values = [v for s, k, v in unit_entries(UNIT.read_text()) if (s, k) == (section, key)]
    assert len(values) == 1, f"{key}= appears {len(values)} times in [{section}]"
    return values[0]


# ---- the unit --------------------------------------------------------------------------------------


def render_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit as `make install-service` writes it, with the install prefix pointing at this venv
    (the same sed the Makefile runs), so that verify checks real executables."""
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "venv").symlink_to(sys.prefix)
    unit = tmp_path / "units" / UNIT.name
    unit.parent.mkdir()
    unit.write_text((text if text is not None else UNIT.read_text()).replace(INSTALL_PREFIX, str(prefix)))
    return unit


def verify_problems(unit: Path) -> list[str]:
    """What `systemd-analyze verify` says about this unit (rc != 0 is a problem of its own)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if unit.name in ln]
    return lines + ([f"exit status {proc.returncode}"] if proc.returncode != 0 else [])


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert (Path(sys.prefix) / "bin" / "runner").exists()
    assert verify_problems(render_unit(tmp_path)) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t.replace("\nKillMode=mixed\n", "\nKilMode=mixed\n"), "Unknown key"),
        (lambda t: t.replace("venv/bin/runner up", "venv/bin/no-such-runner up"), "not executable"),
        (lambda t: t.replace("Restart=on-failure", "Restart=sometimes"), "Failed to parse"),
    ],
)
def test_verify_catches_a_broken_unit(tmp_path: Path, change: Callable[[str], str], expected: str) -> None:
    problems = verify_problems(render_unit(tmp_path, change(UNIT.read_text())))
    assert any(expected in p for p in problems), problems


def test_unit_restarts_for_updates_and_stops_cleanly() -> None:
    assert unit_value("ExecStart").split()[:2] == [f"{INSTALL_PREFIX}/venv/bin/runner", "up"]
    assert "$BENCHER_RUNNER_ARGS" in unit_value("ExecStart").split()
    assert unit_value("Restart") == "on-failure"
    assert str(EXIT_UPDATE) in unit_value("RestartForceExitStatus").split()
    assert unit_value("KillMode") == "mixed"
    assert unit_value("KillSignal") == "SIGTERM"
    assert unit_value("EnvironmentFile") == "/etc/bencher-runner/runner.env"
    assert unit_value("StateDirectory") == unit_value("CacheDirectory") == "bencher-runner"
    envs = [v for s, k, v in unit_entries(UNIT.read_text()) if k == "Environment"]
    assert "BENCHER_RUNNER_STATE_DIR=/var/lib/bencher-runner" in envs
    assert "BENCHER_RUNNER_CACHE_DIR=/var/cache/bencher-runner" in envs
    # The upgrade step: failure ignored ("-"), the module exists, the start timeout covers it.
    pre = unit_value("ExecStartPre")
    assert pre.startswith(f"-{INSTALL_PREFIX}/venv/bin/python -m ")
    module = pre.split()[-1]
    assert (ROOT / "src" / (module.replace(".", "/") + ".py")).is_file()
    minutes = re.fullmatch(r"(\d+)min", unit_value("TimeoutStartSec"))
    assert minutes is not None and int(minutes[1]) * 60 > UPGRADE_TIMEOUT_S
    # No RuntimeDirectory: it would delete the saved tuning originals in /run/bencher-runner on stop.
    assert not any(k.startswith("RuntimeDirectory") for _, k, _ in unit_entries(UNIT.read_text()))


def test_makefile_installs_where_the_unit_points() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^PREFIX \?= /opt/bencher-runner$", makefile, re.MULTILINE)
    assert re.search(r"^CONF_DIR \?= /etc/bencher-runner$", makefile, re.MULTILINE)
    assert re.search(r"^SERVICE_CACHE \?= /var/cache/bencher-runner$", makefile, re.MULTILINE)
    assert "deploy/bencher-runner.service" in makefile and "deploy/runner.env.example" in makefile


# ---- the env example -------------------------------------------------------------------------------


def example_names() -> set[str]:
    names = re.findall(r"^#?([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE)
    assert len(names) == len(set(names)), "a variable is listed twice"
    return set(names)


def click_envvars() -> set[str]:
    names: set[str] = set()
    for param in daemon_command.params:
        envvar = param.envvar
        names.update([envvar] if isinstance(envvar, str) else list(envvar or ()))
    return names


def source_env_names() -> set[str]:
    """Every BENCHER_* name written as a string literal anywhere in the package."""
    names: set[str] = set()
    for path in (ROOT / "src" / "bencher_runner").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and re.fullmatch(r"BENCHER_[A-Z0-9_]*[A-Z0-9]", value):
                names.add(value)
    return names


def test_env_example_has_every_daemon_envvar() -> None:
    assert {"BENCHER_HOST", "BENCHER_RUNNER", "BENCHER_RUNNER_KEY"} <= click_envvars()
    assert click_envvars() - example_names() == set()
    assert (source_env_names() - RUN_ONLY) - example_names() == set()


def test_env_example_names_only_what_is_read() -> None:
    known = (click_envvars() | source_env_names() | UNIT_ONLY) - RUN_ONLY
    assert example_names() - known == set()
    assert COMMAND_ENV in example_names()
    for name in UNIT_ONLY:
        assert f"${name}" in unit_value("ExecStart").split()


def test_env_example_key_is_a_placeholder() -> None:
    text = ENV_EXAMPLE.read_text()
    key = re.search(r"^BENCHER_RUNNER_KEY=(.*)$", text, re.MULTILINE)
    assert key is not None and not re.fullmatch(r"bencher_runner_[A-Za-z0-9]{30}", key[1])


@pytest.mark.parametrize(
    "name",
    ["BENCHER_RUNNER_CACHE_DIR", "BENCHER_RUNNER_STATE_DIR", "BENCHER_RUNNER_AGENT", "BENCHER_RUNNER_QEMU"],
)
def test_non_click_envvars_are_really_read(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bencher_runner.paths import cache_dir, state_dir
    from bencher_runner.sandbox.agent import find_agent
    from bencher_runner.sandbox.qemu import find_qemu

    target = tmp_path / "thing"
    target.write_text("")
    monkeypatch.setenv(name, str(target))
    read: dict[str, Callable[[], Path]] = {
        "BENCHER_RUNNER_CACHE_DIR": cache_dir,
        "BENCHER_RUNNER_STATE_DIR": state_dir,
        "BENCHER_RUNNER_AGENT": find_agent,
        "BENCHER_RUNNER_QEMU": lambda: Path(find_qemu()),
    }
    assert read[name]() == target


def test_kernel_envvars_are_really_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bencher_runner.sandbox.kernel import resolve_bundle

    kernel, modules = tmp_path / "vmlinuz", tmp_path / "modules"
    kernel.write_bytes(b"")
    modules.mkdir()
    monkeypatch.setenv("BENCHER_RUNNER_KERNEL", str(kernel))
    monkeypatch.setenv("BENCHER_RUNNER_KERNEL_MODULES", str(modules))
    assert resolve_bundle(tmp_path / "cache", None, None).kernel == kernel


# ---- the upgrade path ------------------------------------------------------------------------------

FAKE_PIP = """
import json, os, sys
log = os.environ["FAKE_PIP_LOG"]
with open(log, "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items()
                        if k.startswith("BENCHER_")}}) + "\\n")
print("fake pip: done")
sys.exit(int(os.environ.get("FAKE_PIP_EXIT", "0")))
"""


@pytest.fixture
def fake_pip(tmp_path: Path) -> tuple[str, Path]:
    """An upgrade command (from the env, as an operator sets it) that logs instead of installing."""
    script = tmp_path / "fake_pip.py"
    script.write_text(FAKE_PIP)
    command = f"{sys.executable} {script} install --upgrade bencher-runner=={{version}}"
    return command, tmp_path / "pip.log"


def pip_calls(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run_upgrade_step(state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The unit's ExecStartPre, as systemd runs it: a fresh interpreter with the env file's variables."""
    full = {"PATH": os.environ["PATH"], "BENCHER_RUNNER_STATE_DIR": str(state), **env}
    return subprocess.run(
        [sys.executable, "-m", "bencher_runner.daemon.upgrade"],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_update_message_records_the_offer_and_exits_75(tmp_path: Path) -> None:
    server = FakeBencher(key=KEY, server_version="9.9.9")
    await server.start()
    try:
        settings = DaemonSettings(
            host=server.url, runner=server.runner, key=KEY, state_dir=tmp_path / "state", poll_timeout=1
        )
        daemon = Daemon(settings, lambda config, cancel: RunResult("failed", [], None, error="no"))
        assert await daemon.run() == EXIT_UPDATE == 75
    finally:
        await server.close()
    record = load_record(tmp_path / "state")
    assert record is not None
    assert (record.version, record.checksum, record.offered_to) == ("9.9.9", "0" * 64, __version__)
    assert record.url == "https://example.invalid/v9.9.9/runner"
    assert (record.status, record.attempts) == ("pending", 0)
    assert not auto_update_allowed(tmp_path / "state")  # the next start must not loop on the same offer


def test_upgrade_step_runs_the_command_with_the_recorded_version(
    tmp_path: Path, fake_pip: tuple[str, Path]
) -> None:
    command, log = fake_pip
    state = tmp_path / "state"
    record_offer(state, "9.9.9", "https://example.invalid/runner", "ab" * 32)
    proc = run_upgrade_step(
        state, **{COMMAND_ENV: command, "FAKE_PIP_LOG": str(log), "BENCHER_RUNNER_KEY": KEY}
    )
    assert proc.returncode == 0, proc.stderr
    calls = pip_calls(log)
    assert [c["argv"] for c in calls] == [["install", "--upgrade", "bencher-runner==9.9.9"]]
    env = calls[0]["env"]
    assert isinstance(env, dict)
    assert env["BENCHER_RUNNER_UPDATE_VERSION"] == "9.9.9"
    assert env["BENCHER_RUNNER_UPDATE_CHECKSUM"] == "ab" * 32
    assert "BENCHER_RUNNER_KEY" not in env  # the key never reaches the upgrade command
    record = load_record(state)
    assert record is not None and (record.status, record.attempts) == ("upgraded", 1)
    assert f"installed version: {__version__}" in record.detail
    assert "fake pip: done" in proc.stderr
    # Upgraded, but not to the offered version: no second run, and auto-update stays off.
    assert run_upgrade_step(state, **{COMMAND_ENV: command, "FAKE_PIP_LOG": str(log)}).returncode == 0
    assert len(pip_calls(log)) == 1
    assert not auto_update_allowed(state)
    # Once the offered version is what runs, the record is cleared and auto-update is back on.
    assert auto_update_allowed(state, current="9.9.9")
    assert not record_path(state).exists()


def test_failed_upgrade_never_blocks_the_start_and_is_retried_a_few_times(
    tmp_path: Path, fake_pip: tuple[str, Path]
) -> None:
    command, log = fake_pip
    state = tmp_path / "state"
    record_offer(state, "9.9.9", "u", "c")
    env = {COMMAND_ENV: command, "FAKE_PIP_LOG": str(log), "FAKE_PIP_EXIT": "1"}
    for _ in range(MAX_ATTEMPTS + 2):
        proc = run_upgrade_step(state, **env)
        assert proc.returncode == 0, proc.stderr
    assert "not trying again" in proc.stderr
    assert len(pip_calls(log)) == MAX_ATTEMPTS
    record = load_record(state)
    assert record is not None and (record.status, record.attempts) == ("failed", MAX_ATTEMPTS)
    assert not auto_update_allowed(state)


def test_no_upgrade_command_skips_and_starts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    record_offer(state, "0.6.12", "https://github.com/bencherdev/bencher/releases/x", "c")
    proc = run_upgrade_step(state)
    assert proc.returncode == 0
    assert f"{COMMAND_ENV} is not set" in proc.stderr
    assert "never downloads" in proc.stderr
    record = load_record(state)
    assert record is not None and record.status == "skipped"


def test_nothing_recorded_nothing_done(tmp_path: Path, fake_pip: tuple[str, Path]) -> None:
    command, log = fake_pip
    proc = run_upgrade_step(tmp_path / "state", **{COMMAND_ENV: command, "FAKE_PIP_LOG": str(log)})
    assert (proc.returncode, proc.stderr, pip_calls(log)) == (0, "", [])
    assert auto_update_allowed(tmp_path / "state")


def test_a_version_that_is_not_a_plain_string_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    record_offer(state, "1.0; touch /tmp/pwned", "u", "c")
    calls: list[object] = []
    record = apply_pending_update(state, {COMMAND_ENV: "pip install x=={version}"}, run=calls.append)  # type: ignore[arg-type]
    assert calls == []
    assert isinstance(record, UpdateRecord) and record.status == "failed"
    assert "not a plain version string" in record.detail


def test_upgrade_timeout_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    state = tmp_path / "state"
    record_offer(state, "9.9.9", "u", "c")

    def slow(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, UPGRADE_TIMEOUT_S)

    record = apply_pending_update(state, {COMMAND_ENV: "pip install x=={version}"}, run=slow)
    assert record is not None and record.status == "failed" and "timed out" in record.detail
