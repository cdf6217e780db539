"""TAP networking: the guest reaches a server in a namespace the test creates, through the job's netns.

Addresses: the test's server host is 198.18.0.2 (the RFC 2544 benchmarking range) in a namespace of
its own, linked to the host by a veth; no traffic leaves this machine.
"""

import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import runner

SERVER_IP = "198.18.0.2"
PORT = 8080


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def server_namespace(tmp_path: Path) -> Iterator[str]:
    name = f"brtest-{secrets.token_hex(3)}"
    veth = f"bt-{name[-6:]}"
    (tmp_path / "hello.txt").write_text("hello from the test's namespace\n")
    sh("ip", "netns", "add", name)
    server = None
    try:
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        sh("ip", "addr", "add", "198.18.0.1/30", "dev", veth)
        sh("ip", "link", "set", veth, "up")
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{SERVER_IP}/30", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
        ):
            sh("ip", "netns", "exec", name, *argv)
        server = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-m", "http.server", "--bind", SERVER_IP,
             "--directory", str(tmp_path), str(PORT)],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("wb"),
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((SERVER_IP, PORT), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"test server did not start: {(tmp_path / 'server.log').read_text()}"
                    ) from None
                time.sleep(0.1)
        yield name
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "delete", veth], capture_output=True)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def job_leftovers() -> list[str]:
    netns = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
             if n.startswith("bencher-")]  # fmt: skip
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return (
        netns
        + [t for t in tables.split() if t.startswith("bencher_")]
        + [line for line in links.splitlines() if " bh-" in line]
    )


def test_tap_network_reaches_the_test_namespace(plain_image: str, server_namespace: str) -> None:
    forward_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    script = f"ls /sys/class/net; wget -qO- http://{SERVER_IP}:{PORT}/hello.txt"
    run = runner(
        "--image", plain_image, "--json", "--network", "--network-mode", "tap", "--", "/bin/sh", "-c", script
    )
    assert run.returncode == 0, run.stderr
    out = run.doc["results"][0]["stdout"].split("\n")
    assert out[:2] == ["eth0", "lo"]
    assert out[2] == "hello from the test's namespace"
    assert job_leftovers() == []
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forward_before


def test_jailed_user_nat_reaches_the_world_but_not_the_hosts_loopback(
    plain_image: str, server_namespace: str
) -> None:
    """A jailed QEMU's slirp stack runs in the job's netns: 10.0.2.2 is that namespace's own lo."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    script = (
        f"wget -qO- http://{SERVER_IP}:{PORT}/hello.txt; "
        f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 10.0.2.2 {port}; echo rc=$?"
    )
    try:
        run = runner("--image", plain_image, "--json", "--network", "--", "/bin/sh", "-c", script)
        assert run.returncode == 0, run.stderr
        assert run.doc["results"][0]["stdout"] == "hello from the test's namespace\nrc=1\n"
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing reached the host's loopback
    finally:
        listener.close()
    assert job_leftovers() == []
