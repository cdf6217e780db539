"""TAP networking in a per-job network namespace: the form Firecracker needs, also usable by QEMU.

Each job gets its own namespace holding the VM's TAP device, so every guest sees the same fixed
addresses (192.168.241.2/30, gateway .1) and nothing of the host's interfaces. A veth pair links the
namespace to the host on a /30 from 100.64.0.0/10 picked per job; the namespace NATs the guest onto
its veth end and the host NATs that /30 onto its own routes (an nftables table per job, deleted with
the job). The guest's nameserver is the host's first non-loopback one.

Host state: IPv4 forwarding must be on for the host side to route. If it is off, it is switched on
while any job network exists (counted under a lock in /run) and switched back off after the last one.
iproute2 (`ip`) and nftables (`nft`) do the work: both are the standard tools, and their commands in
the error messages are what an operator would type to debug.

The jailed VMM (jail.py) joins the namespace unprivileged: the TAP belongs to the jail uid/gid
(``tap_owner``). A jailed QEMU on user-mode NAT gets the same namespace without a TAP (``tap=False``),
so its slirp stack reaches the world through the namespace's NAT and never the host's loopback; a
jailed Firecracker without network gets an empty namespace (`empty_netns`: only lo).
"""

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bencher_runner.sandbox.agentconfig import GuestNetwork
from bencher_runner.sandbox.network import NetworkPlan
from bencher_runner.spec.errors import SandboxError

GUEST = GuestNetwork(address="192.168.241.2/30", gateway="192.168.241.1", dns="")
TAP_GATEWAY = "192.168.241.1/30"
TAP_NAME = "tap0"
VETH_NS_NAME = "veth0"
LINK_POOL = ipaddress.IPv4Network("100.64.0.0/10")
FORWARD_STATE = Path("/run/bencher-runner/ip_forward.json")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
NAME_PREFIX = "bencher-"
# Inside the job's namespace: the guest's traffic leaves as the namespace's veth address.
NS_RULES = """table ip nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat;
        ip saddr {guest} oifname "{veth}" masquerade
    }}
}}
"""
# On the host, one table per job (deleted with it): NAT the job's link onto the host's routes.
HOST_RULES = """table ip {table} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat;
        ip saddr {link} oifname != "{veth}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter;
        iifname "{veth}" accept
        oifname "{veth}" ct state established,related accept
    }}
}}
"""


def run(argv: list[str], *, netns: str | None = None, stdin: str | None = None) -> str:
    full = ["ip", "netns", "exec", netns, *argv] if netns else argv
    try:
        proc = subprocess.run(full, input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SandboxError(
            f"`{full[0]}` is not installed; TAP networking needs iproute2 and nftables "
            "(`apt-get install iproute2 nftables`)"
        ) from None
    if proc.returncode != 0:
        raise SandboxError(f"job network set-up failed: `{' '.join(full)}`: {proc.stderr.strip()}")
    return proc.stdout


def host_nameserver(resolv_conf: str) -> str | None:
    """The first nameserver a guest can reach (a loopback resolver on the host is not reachable)."""
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            with contextlib.suppress(ValueError):
                address = ipaddress.ip_address(fields[1])
                if address.version == 4 and not address.is_loopback:
                    return str(address)
    return None


def pick_link_subnet(used: set[ipaddress.IPv4Network], token: int) -> ipaddress.IPv4Network:
    """A free /30 of the link pool, starting at a place derived from ``token``."""
    count = LINK_POOL.num_addresses // 4
    for step in range(count):
        index = (token + step) % count
        candidate = ipaddress.IPv4Network((int(LINK_POOL.network_address) + 4 * index, 30))
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise SandboxError(f"no free /30 left in {LINK_POOL} for a job network")


def used_subnets() -> set[ipaddress.IPv4Network]:
    doc = json.loads(run(["ip", "-j", "-4", "addr", "show"]))
    return {
        ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
        for link in doc
        for a in link.get("addr_info", [])
    }


def _forwarding_update(delta: int) -> None:
    FORWARD_STATE.parent.mkdir(parents=True, exist_ok=True)
    with FORWARD_STATE.with_suffix(".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = json.loads(FORWARD_STATE.read_text())
        except (OSError, ValueError):
            if delta < 0:
                return  # nothing recorded: nothing to restore
            state = {"users": 0, "original": IP_FORWARD.read_text().strip()}
        state["users"] = max(0, state["users"] + delta)
        if state["users"] > 0:
            IP_FORWARD.write_text("1\n")
            FORWARD_STATE.write_text(json.dumps(state))
        else:
            IP_FORWARD.write_text(state["original"] + "\n")
            FORWARD_STATE.unlink(missing_ok=True)


@contextlib.contextmanager
def forwarding_enabled() -> Iterator[None]:
    """IPv4 forwarding on for the duration; restored by the last user if it was off."""

    _forwarding_update(+1)
    try:
        yield
    finally:
        _forwarding_update(-1)


def forwarding_release() -> None:
    _forwarding_update(-1)


@dataclass
class JobNetwork:
    """A job's namespace, veth link and NAT; use as a context manager, everything is removed after."""

    name: str
    link: ipaddress.IPv4Network
    nameserver: str
    tap: bool = True  # False: no TAP (a jailed QEMU's user-mode NAT runs in the namespace)
    tap_owner: tuple[int, int] | None = None  # uid, gid of the jailed VMM that opens the TAP

    @property
    def host_veth(self) -> str:
        return self.name.replace(NAME_PREFIX, "bh-")[:15]

    @property
    def plan(self) -> NetworkPlan:
        netdev = f"tap,id=net0,ifname={TAP_NAME},script=no,downscript=no"
        guest = GuestNetwork(GUEST.address, GUEST.gateway, self.nameserver)
        return NetworkPlan(
            qemu_args=("-netdev", netdev, "-device", "virtio-net-device,netdev=net0"), guest=guest
        )

    def command_prefix(self) -> list[str]:
        """Run the VM process inside the namespace, where its TAP device is."""
        return [shutil.which("ip") or "ip", "netns", "exec", self.name]

    def create(self) -> None:
        hosts = list(self.link.hosts())
        host_ip, ns_ip = f"{hosts[0]}/30", f"{hosts[1]}/30"
        run(["ip", "netns", "add", self.name])
        run(
            [
                "ip",
                "link",
                "add",
                self.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                VETH_NS_NAME,
                "netns",
                self.name,
            ]
        )
        run(["ip", "addr", "add", host_ip, "dev", self.host_veth])
        run(["ip", "link", "set", self.host_veth, "up"])
        ns = self.name
        run(["ip", "link", "set", "lo", "up"], netns=ns)
        run(["ip", "addr", "add", ns_ip, "dev", VETH_NS_NAME], netns=ns)
        run(["ip", "link", "set", VETH_NS_NAME, "up"], netns=ns)
        run(["ip", "route", "add", "default", "via", str(hosts[0])], netns=ns)
        if self.tap:
            owner = (
                ["user", str(self.tap_owner[0]), "group", str(self.tap_owner[1])] if self.tap_owner else []
            )
            run(["ip", "tuntap", "add", "dev", TAP_NAME, "mode", "tap", *owner], netns=ns)
            run(["ip", "addr", "add", TAP_GATEWAY, "dev", TAP_NAME], netns=ns)
            run(["ip", "link", "set", TAP_NAME, "up"], netns=ns)
        run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], netns=ns)  # per namespace: not the host's
        guest_net = ipaddress.IPv4Interface(GUEST.address).network
        run(["nft", "-f", "-"], netns=ns, stdin=NS_RULES.format(guest=guest_net, veth=VETH_NS_NAME))
        run(
            ["nft", "-f", "-"], stdin=HOST_RULES.format(table=self.table, link=self.link, veth=self.host_veth)
        )

    @property
    def table(self) -> str:
        return self.name.replace("-", "_")

    def remove(self) -> None:
        for argv in (
            ["nft", "delete", "table", "ip", self.table],
            ["ip", "link", "delete", self.host_veth],
            ["ip", "netns", "delete", self.name],
        ):
            subprocess.run(argv, capture_output=True, check=False)


RECORD = "network.json"


@contextlib.contextmanager
def job_network(
    work: Path, *, tap: bool = True, tap_owner: tuple[int, int] | None = None
) -> Iterator[JobNetwork]:
    """The job's network, recorded in its (locked) work dir so a crashed job's can be removed later."""
    if os.geteuid() != 0:
        raise SandboxError(
            "TAP networking needs root (network namespaces, TAP, nftables); use --network-mode user"
            if tap
            else "a jailed VM's network needs root (a network namespace and NAT); run the runner as root "
            "or pass --danger-no-jail on a development host"
        )
    token = secrets.randbits(32)
    try:
        resolv = Path("/etc/resolv.conf").read_text()
    except OSError:
        resolv = ""
    network = JobNetwork(
        name=f"{NAME_PREFIX}{token:08x}",
        link=pick_link_subnet(used_subnets(), token),
        nameserver=host_nameserver(resolv) or "192.168.241.1",
        tap=tap,
        tap_owner=tap_owner,
    )
    (work / RECORD).write_text(json.dumps({"name": network.name}))
    with forwarding_enabled():
        try:
            network.create()
            yield network
        finally:
            network.remove()
    (work / RECORD).unlink()


@contextlib.contextmanager
def empty_netns(work: Path) -> Iterator[str]:
    """A network namespace holding only lo (up), recorded like a job network; removed after."""
    name = f"{NAME_PREFIX}{secrets.randbits(32):08x}"
    (work / RECORD).write_text(json.dumps({"name": name, "empty": True}))
    try:
        run(["ip", "netns", "add", name])
        run(["ip", "link", "set", "lo", "up"], netns=name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        (work / RECORD).unlink(missing_ok=True)


def release_stale_network(work: Path) -> str | None:
    """Remove the network a killed job left (its work dir is stale), and release its forwarding use."""
    try:
        record = json.loads((work / RECORD).read_text())
        name = record["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not str(name).startswith(NAME_PREFIX):
        return None
    JobNetwork(name=name, link=LINK_POOL, nameserver="").remove()
    if not record.get("empty"):  # an empty namespace never switched forwarding on
        with contextlib.suppress(OSError):
            forwarding_release()
    return str(name)
