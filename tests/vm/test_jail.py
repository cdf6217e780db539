"""The jail around every VMM (sandbox/jail.py), checked on a real `runner run`.

Two kinds of test, each without network, with user-mode NAT and with a TAP:
- inspection: a guest that sleeps (synced on its output, never on boot speed); the test finds its
  QEMU through the job's work dir and reads /proc: uid/gid, root, namespaces, capabilities,
  no_new_privs, seccomp, rlimits, environment;
- escape drill: BENCHER_RUNNER_QEMU points at a small static C binary built here, started in the jail
  exactly as QEMU would be; it tries what an attacker in the VMM would try first and prints one line
  per attempt, each asserted. The same drill with --danger-no-jail shows that the drill can fail.
Afterwards nothing of the jail is left: no process of the jail uid, no job netns, no work dir.
"""

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bencher_runner.paths import cache_dir, work_root
from bencher_runner.recovery import jail_uid_processes, recover_from_crash
from bencher_runner.spec.config import DEFAULT_JAIL_UID
from tests.support.guest_output import wait_for_guest_stdout

NETWORKS = {"none": [], "user": ["--network"], "tap": ["--network", "--network-mode", "tap"]}
BOOT_WAIT_S = 400  # a loaded TCG host; the test waits on the guest's output, never on a guess

ESCAPE_C = r"""
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void report(const char *name, int escaped) {
    if (escaped) printf("%s: ESCAPED\n", name);
    else printf("%s: blocked: %s\n", name, strerror(errno));
    fflush(stdout);
}

int main(void) {
    char buf[64];
    int fd = open(KEY_FILE, O_RDONLY);
    report("read-key", fd >= 0 && read(fd, buf, sizeof buf) > 0);
    report("list-state-dir", opendir(STATE_DIR) != NULL);
    report("read-cache-probe", open(CACHE_PROBE, O_RDONLY) >= 0);
    fd = open(OUTSIDE_FILE, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    report("write-outside", fd >= 0 && write(fd, "x", 1) == 1);
    report("write-in-jail-tree", open(BINARY_DIR "/written", O_WRONLY | O_CREAT | O_TRUNC, 0644) >= 0);
    DIR *dir = opendir("/proc");
    int pids = 0;
    struct dirent *entry;
    while (dir != NULL && (entry = readdir(dir)) != NULL)
        pids += entry->d_name[0] >= '1' && entry->d_name[0] <= '9';
    if (dir != NULL && pids <= 1) errno = ESRCH;
    report("list-processes", pids > 1);
    report("signal-the-test", kill(TEST_PID, 0) == 0);
    int sock = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(LISTEN_PORT)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    report("connect-host-loopback", sock >= 0 && connect(sock, (struct sockaddr *)&addr, sizeof addr) == 0);
    report("setuid-0", setuid(0) == 0);
    return 3;
}
"""
ATTEMPTS = {
    "read-key", "list-state-dir", "read-cache-probe", "write-outside", "write-in-jail-tree",
    "list-processes", "signal-the-test", "connect-host-loopback", "setuid-0",
}  # fmt: skip


@dataclass
class Host:
    """What a runner may hold and a VMM must never reach."""

    state: Path
    key_file: Path
    cache_probe: Path
    env: dict[str, str]
    probe_value: str


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    token = secrets.token_hex(4)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key_file = state / "runner.key"
    key_file.write_text(f"key-{token}\n")
    key_file.chmod(0o600)
    cache_probe = cache_dir() / f"jail-probe-{token}"
    cache_probe.write_text("cache probe\n")
    env = {
        **os.environ,
        "COLUMNS": "200",
        "BENCHER_RUNNER_STATE_DIR": str(state),
        "BENCHER_RUNNER_KEY": f"key-{token}",
        "JAIL_TEST_PROBE": token,
    }
    try:
        yield Host(state, key_file, cache_probe, env, token)
    finally:
        cache_probe.unlink(missing_ok=True)


def runner_argv(image: str, network: str, *command: str) -> list[str]:
    return [
        sys.executable, "-m", "bencher_runner", "run", "--image", image, "--json", "--accel", "tcg",
        "--timeout", "900", *NETWORKS[network], "--", *command,
    ]  # fmt: skip


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}


def vmm_of(iteration: Path) -> int:
    """The jail-uid process whose ancestors started it for this iteration (their argv names its files)."""
    for pid in jail_uid_processes(DEFAULT_JAIL_UID):
        ancestor = pid
        for _ in range(6):
            ancestor = int(status(ancestor)["PPid"])
            if ancestor <= 1:
                break
            if str(iteration) in Path(f"/proc/{ancestor}/cmdline").read_bytes().decode(errors="replace"):
                return pid
    raise AssertionError(f"no process of uid {DEFAULT_JAIL_UID} runs the VM of {iteration}")


def wait_ready(proc: "subprocess.Popen[bytes]") -> Path:
    """The output disk of the guest that printed jail-ready; fails at once if the runner ended first."""
    deadline = time.monotonic() + BOOT_WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"runner ended ({proc.returncode}) before its guest was ready")
        with contextlib.suppress(AssertionError):
            return wait_for_guest_stdout(work_root(cache_dir()), b"jail-ready", 5)
    raise AssertionError(f"no guest was ready within {BOOT_WAIT_S} s")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def job_netns(iteration: Path) -> str | None:
    """The job network namespace recorded for this iteration (user-mode NAT) or its job (TAP)."""
    for record in (iteration / "network.json", iteration.parent / "network.json"):
        with contextlib.suppress(OSError):
            return str(json.loads(record.read_text())["name"])
    return None


def assert_nothing_left(netns: str | None = None) -> None:
    """Only what this test made: other sessions may run jobs (and their namespaces) on this host."""
    assert jail_uid_processes(DEFAULT_JAIL_UID) == {}, "processes of the jail uid are left"
    assert netns is None or netns not in netns_names(), f"the job's network namespace {netns} is left"


@pytest.mark.timeout(BOOT_WAIT_S + 120)
@pytest.mark.parametrize("network", list(NETWORKS))
def test_a_running_vmm_is_jailed(plain_image: str, host: Host, network: str) -> None:
    proc = subprocess.Popen(
        runner_argv(plain_image, network, "/bin/sh", "-c", "echo jail-ready; sleep 900"),
        env=host.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        disk = wait_ready(proc)
        pid = vmm_of(disk.parent)
        netns = job_netns(disk.parent)
        assert (netns is None) == (network == "none")  # without network: bwrap's own, empty one
        st = status(pid)
        assert st["Uid"].split() == [str(DEFAULT_JAIL_UID)] * 4
        assert st["Gid"].split() == [str(DEFAULT_JAIL_UID)] * 4
        assert st["Groups"] == ""
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"  # QEMU's -sandbox filter stays
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0 and int(st["CapBnd"], 16) == 0
        root = Path(f"/proc/{pid}/root")
        assert (root.stat().st_dev, root.stat().st_ino) != (os.stat("/").st_dev, os.stat("/").st_ino)
        for secret in (host.state, host.key_file, Path("/root"), host.cache_probe, cache_dir()):
            assert not (root / str(secret).lstrip("/")).exists(), f"{secret} is visible in the jail"
        visible = {"bin", "dev", "lib", "lib64", "sbin", "usr"}  # /usr read-only and its merged-/usr links
        visible |= {"vmlinux", "initrd.cpio", "rootfs.ext4", "output.img", "serial.log"}
        visible |= {"etc"} if network == "user" else set()  # its resolv.conf, for slirp's DNS forwarder
        assert {p.name for p in root.iterdir()} == visible
        for ns in ("mnt", "net", "pid"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        if netns is not None:  # the job's namespace, joined
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert environ == b"", environ  # nothing of the runner's: not the key, not the probe
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert re.search(r"Max core file size\s+0\s+0", limits)
        assert re.search(r"Max open files\s+4096\s+4096", limits)
        assert re.search(r"Max processes\s+1024\s+1024", limits)
        owned = {p.name for p in disk.parent.iterdir() if p.stat().st_uid == DEFAULT_JAIL_UID}
        private_tun = network == "tap" and os.stat("/dev/net/tun").st_mode & 0o006 != 0o006
        assert owned == {"rootfs.ext4", "output.img", "serial.log"} | ({"dev-tun"} if private_tun else set())
        assert cache_dir().stat().st_mode & 0o077 == 0  # the cache is root's alone
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr.decode(errors="replace")
    assert_nothing_left(netns)


def build_escape(tmp_path: Path, host: Host, port: int) -> Path:
    source = tmp_path / "escape.c"
    source.write_text(ESCAPE_C)
    binary_dir = tmp_path / "bin"
    binary_dir.mkdir()
    binary = binary_dir / "qemu-system-x86_64"
    defines = {
        "KEY_FILE": f'"{host.key_file}"',
        "STATE_DIR": f'"{host.state}"',
        "CACHE_PROBE": f'"{host.cache_probe}"',
        "OUTSIDE_FILE": f'"{tmp_path / "outside"}"',
        "BINARY_DIR": f'"{binary_dir}"',
        "TEST_PID": str(os.getpid()),
        "LISTEN_PORT": str(port),
    }
    subprocess.run(
        [
            "gcc",
            "-static",
            "-O1",
            "-o",
            str(binary),
            str(source),
            *(f"-D{k}={v}" for k, v in defines.items()),
        ],
        check=True,
        capture_output=True,
    )
    return binary


def run_drill(plain_image: str, tmp_path: Path, host: Host, network: str, *flags: str) -> dict[str, str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    binary = build_escape(tmp_path, host, listener.getsockname()[1])
    argv = runner_argv(plain_image, network, "/bin/true")
    proc = subprocess.run(
        argv[: argv.index("--")] + list(flags) + argv[argv.index("--") :],
        env={**host.env, "BENCHER_RUNNER_QEMU": str(binary)},
        capture_output=True,
        timeout=300,
    )
    error = str(json.loads(proc.stdout)["error"])  # "the VM stopped ... (QEMU exited with status 3: ...)"
    lines = dict(re.findall(r"([a-z0-9-]+): (ESCAPED|blocked: [^\n)]*)", error))
    assert set(lines) == ATTEMPTS, error + proc.stderr.decode(errors="replace")
    try:
        listener.accept()
        lines["connect-host-loopback"] += " (and the test's listener was reached)"
    except BlockingIOError:
        pass
    finally:
        listener.close()
    return lines


@pytest.mark.parametrize("network", list(NETWORKS))
def test_escape_drill_every_attempt_fails(plain_image: str, tmp_path: Path, host: Host, network: str) -> None:
    lines = run_drill(plain_image, tmp_path, host, network)
    escaped = {name: line for name, line in lines.items() if not line.startswith("blocked")}
    assert escaped == {}, lines
    assert not (tmp_path / "outside").exists() and not (tmp_path / "bin" / "written").exists()
    assert "Connection refused" in lines["connect-host-loopback"]  # its own netns: nobody listens
    assert "Operation not permitted" in lines["setuid-0"]
    assert_nothing_left()


def test_the_drill_detects_an_unjailed_vmm(plain_image: str, tmp_path: Path, host: Host) -> None:
    """The control: with --danger-no-jail the same binary runs as root on the host, and the drill says so."""
    lines = run_drill(plain_image, tmp_path, host, "none", "--danger-no-jail")
    assert {name for name, line in lines.items() if line == "ESCAPED"} == ATTEMPTS - {"connect-host-loopback"}
    assert "(and the test's listener was reached)" in lines["connect-host-loopback"]


@pytest.mark.timeout(BOOT_WAIT_S + 120)
def test_a_killed_runner_leaves_no_jail(plain_image: str, host: Host) -> None:
    """SIGKILL the runner mid-job: its VMM dies with it; the next start removes the rest."""
    proc = subprocess.Popen(
        runner_argv(plain_image, "user", "/bin/sh", "-c", "echo jail-ready; sleep 900"),
        env=host.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    disk = wait_ready(proc)
    pid = vmm_of(disk.parent)
    netns = job_netns(disk.parent)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while pid in jail_uid_processes(DEFAULT_JAIL_UID) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid not in jail_uid_processes(DEFAULT_JAIL_UID), "the VMM outlived its runner"
    assert netns in netns_names() and disk.parent.exists()  # what only the next start can remove
    recover_from_crash(cache_dir(), warn=lambda _: None, info=lambda _: None)
    assert not disk.parent.exists()
    assert_nothing_left(netns)
