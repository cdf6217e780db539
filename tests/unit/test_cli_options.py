"""Every option of `runner run` and `runner daemon` with bad values: one line naming the option, exit
2, never a traceback; the host options are the same for both commands, with the same policy."""

from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from bencher_runner.cli import main
from bencher_runner.spec.config import HostSettings

BAD_INTS = ["-1", "abc", "", "1 2", "9" * 30, "1\x00"]
BAD_CHOICES = ["nope", "", "a b", "x\x00"]
BAD_PATHS = ["", "a\x00b"]
BAD_TEXT = ["a\x00b"]
NOT_EMPTY = ["", " "]
NO_SPACES = ["a b"]
# Options whose type is a string: the values each cannot take (others are valid: an empty argument).
TEXT_BAD = {
    "--image": BAD_TEXT + NOT_EMPTY + ["a\nb"],
    "--token": BAD_TEXT + NOT_EMPTY + NO_SPACES,
    "--registry-username": BAD_TEXT + NOT_EMPTY + NO_SPACES,
    "--registry-password": BAD_TEXT + NOT_EMPTY + ["a\nb"],
    "--entrypoint": BAD_TEXT,
    "--cmd": BAD_TEXT,
    "--env": [*BAD_TEXT, "", "=x", "NOEQUALS"],
    "--output": [*BAD_TEXT, ""],
    "--host": BAD_TEXT + NOT_EMPTY + ["ftp://x", "api.bencher.dev", "https://"],
    "--runner": BAD_TEXT + NOT_EMPTY + NO_SPACES,
    "--key": BAD_TEXT + NOT_EMPTY + NO_SPACES,
    "--governor": ["a b", "x\x00", "../x"],
    "--metrics-addr": [],
}
# Checked when the job starts, against this host (tests/unit/test_capacity.py), not by the flag.
HOST_BOUNDED = {
    "--memory": ["9" * 30],  # validated when bound (tests/registry/test_observability.py); "" is off
}
COMMANDS = {
    "run": ["run", "--image", "examples/hello/oci:latest"],
    "daemon": ["daemon", "--runner", "r", "--key", "bencher_runner_k"],
}
SECRETS = ("--token", "--registry-password", "--key")


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The commands parse and validate everything, then stop before any work (no job, no daemon)."""
    captured: dict[str, Any] = {}
    import bencher_runner.cli.daemon as daemon_cli
    import bencher_runner.recovery as recovery
    import bencher_runner.run as run_module

    def fake_run_command(config: Any, **kwargs: Any) -> int:
        captured["config"] = config
        return 0

    class Lock:
        def release(self) -> None:
            pass

    def fake_run_daemon(settings: Any, *args: Any) -> int:
        captured["daemon"] = settings
        return 0

    monkeypatch.setattr(run_module, "run_command", fake_run_command)
    monkeypatch.setattr(daemon_cli, "run_daemon", fake_run_daemon)
    monkeypatch.setattr(daemon_cli, "take_daemon_lock", lambda run_dir: Lock())
    monkeypatch.setattr(recovery, "recover_from_crash", lambda *a, **k: None)
    monkeypatch.setattr(daemon_cli, "setup_logging", lambda *a, **k: None)

    def run(args: list[str]) -> tuple[Result, dict[str, Any]]:
        captured.clear()
        return CliRunner().invoke(main, args), captured

    return run


def _cases() -> list[tuple[str, str, str]]:
    cases = []
    for command in COMMANDS:
        cmd = main.get_command(click.Context(main), command)
        assert cmd is not None
        for param in cmd.params:
            if not isinstance(param, click.Option) or param.is_flag:
                continue
            opt = max(param.opts, key=len)
            skip = HOST_BOUNDED.get(opt, [])
            if opt in TEXT_BAD:
                values = TEXT_BAD[opt]
            elif isinstance(param.type, click.IntRange) or param.type is click.INT:
                values = BAD_INTS if param.type.min is None or param.type.min >= 0 else BAD_INTS[1:]  # type: ignore[attr-defined]
            elif isinstance(param.type, click.Choice):
                values = BAD_CHOICES
            elif isinstance(param.type, click.Path):
                values = BAD_PATHS
            else:
                raise AssertionError(f"{command} {opt}: no bad values listed for type {param.type!r}")
            cases += [(command, opt, value) for value in values if value not in skip]
    return cases


@pytest.mark.parametrize(("command", "option", "value"), _cases())
def test_a_bad_value_is_one_line_naming_the_option_and_exit_2(
    invoke: Any, command: str, option: str, value: str
) -> None:
    base = COMMANDS[command]
    args = ["run", "--image", value] if option == "--image" else [*base, option, value]
    result, captured = invoke(args)
    assert not captured, f"{option} {value!r} was accepted"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert option in result.output, result.output
    if option in SECRETS and value.strip():
        assert value not in result.output  # a secret is never echoed


def test_the_daemon_takes_every_host_setting_runner_run_takes(invoke: Any, tmp_path: Path) -> None:
    kernel, modules, jailer = tmp_path / "vmlinux", tmp_path / "modules", tmp_path / "jailer"
    host_flags = [
        "--sandbox", "firecracker", "--kernel", str(kernel), "--kernel-modules", str(modules),
        "--jailer", str(jailer), "--jailer-chroot-base", str(tmp_path / "jail"), "--jail-uid", "70000",
        "--jail-gid", "70001", "--sandbox-log-level", "debug", "--firecracker", str(tmp_path / "fc"),
        "--grace-period", "3", "--max-file-count", "7", "--max-output-size", "1000", "--accel", "kvm",
    ]  # fmt: skip
    result, daemon = invoke([*COMMANDS["daemon"], *host_flags])
    assert result.exit_code == 0, result.output
    settings: HostSettings = daemon["daemon"].host_settings
    result, run = invoke([*COMMANDS["run"], *host_flags])
    assert result.exit_code == 0, result.output
    assert run["config"].host == settings
    assert (settings.kernel, settings.kernel_modules, settings.jailer) == (kernel, modules, jailer)
    assert (settings.jail_uid, settings.jail_gid, settings.sandbox_log_level) == (70000, 70001, "Debug")
    assert settings.network == "tap"  # Firecracker has no user-mode NAT: its default is TAP


@pytest.mark.parametrize(
    ("flags", "text"),
    [
        (["--sandbox", "firecracker", "--network-mode", "user"], "has no user-mode NAT"),
        (["--sandbox", "firecracker", "--accel", "tcg"], "runs on KVM only"),
        (["--jailer", "/x"], "--jailer need --sandbox firecracker"),
        (["--sandbox-log-level", "Info"], "--sandbox-log-level need --sandbox firecracker"),
        (["--max-symlinks", "3"], "--max-symlinks applies to jobs without a sandbox only"),
    ],
)
def test_an_impossible_combination_is_refused_alike_by_both_commands(
    invoke: Any, flags: list[str], text: str
) -> None:
    outputs = []
    for command in ("run", "daemon"):
        extra = ["--network"] if command == "run" and "--network-mode" in flags else []
        result, captured = invoke([*COMMANDS[command], *flags, *extra])
        assert result.exit_code == 2 and not captured, result.output
        assert text in result.output and "Traceback" not in result.output
        outputs.append(result.output.strip().splitlines()[-1])
    assert outputs[0] == outputs[1]  # the same text from both commands
