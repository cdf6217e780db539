"""The job config the guest agent reads from ``/bencher/job`` in the initramfs.

A flat list of NUL-terminated ``KEY=VALUE`` entries, because the agent is a small static C program:
splitting on NUL and the first '=' needs no parser, and argv/env strings may hold any byte but NUL.
Everything is validated here so the guest only ever sees well-formed configs.

Format (the agent's comment block in guest/agent.c documents the same)::

    version=1\\0              first entry, always
    arg=VALUE\\0              repeated, in order, at least one: argv (argv[0] looked up in PATH
                              from the job env if it has no '/')
    env=NAME=VALUE\\0         repeated: the command's complete environment (nothing is inherited)
    cwd=/ABS/PATH\\0          working directory inside the image
    uid=N\\0 gid=N\\0         decimal
    groups=N,N,...\\0         comma-separated decimal supplementary gids; may be empty
    max_output=N\\0           byte cap for stdout, for stderr and for each output file separately
    output=PATH\\0            repeated, optional: files to collect after exit (relative to cwd),
                              each under 4096 bytes
    net_addr=A.B.C.D/N\\0    optional: configure eth0 with this address
    net_gw=A.B.C.D\\0        optional: default route via this gateway
    net_dns=A.B.C.D\\0       optional: nameserver written to /etc/resolv.conf

Entries split at the FIRST '='. Strings are UTF-8 with errors="surrogateescape" (so undecodable
bytes from the image config round-trip).
"""

import ipaddress
from dataclasses import dataclass

from bencher_runner.spec.errors import SpecError

CONFIG_VERSION = 1
PATH_MAX = 4096  # the guest's limit, including the terminating NUL
MAX_ID = 2**32 - 2  # uid_t/gid_t are u32 in the guest and (u32)-1 means "no change" to set*id()


@dataclass(frozen=True)
class GuestNetwork:
    address: str  # "A.B.C.D/PREFIX"
    gateway: str
    dns: str


@dataclass(frozen=True)
class AgentConfig:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    max_output: int
    outputs: tuple[str, ...] = ()
    network: GuestNetwork | None = None


def _encode(what: str, value: str) -> bytes:
    if "\0" in value:
        raise SpecError(f"{what} {value!r} contains a NUL byte, which the guest cannot pass on")
    return value.encode("utf-8", errors="surrogateescape")


def _validate(cfg: AgentConfig) -> None:
    if not cfg.argv:
        raise SpecError("the command is empty: give at least the program to run")
    for name, _ in cfg.env:
        if not name or "=" in name:
            raise SpecError(
                f"environment variable name {name!r} is invalid: it must be non-empty without '='"
            )
    if not cfg.cwd.startswith("/"):
        raise SpecError(f"working directory {cfg.cwd!r} is not an absolute path")
    for what, number in (("uid", cfg.uid), ("gid", cfg.gid), *(("group", g) for g in cfg.groups)):
        if not 0 <= number <= MAX_ID:
            raise SpecError(f"{what} {number} is out of range (0..{MAX_ID})")
    if cfg.max_output < 0:
        raise SpecError(f"max_output {cfg.max_output} is negative")
    for path in cfg.outputs:
        if len(path.encode("utf-8", errors="surrogateescape")) >= PATH_MAX:
            raise SpecError(f"output path {path[:60]!r}... is too long (limit {PATH_MAX - 1} bytes)")


def encode_agent_config(cfg: AgentConfig) -> bytes:
    """The bytes of ``/bencher/job`` for this config; raises SpecError on a value the guest cannot take."""
    _validate(cfg)
    entries = [b"version=%d" % CONFIG_VERSION]
    entries += [b"arg=" + _encode("argument", arg) for arg in cfg.argv]
    entries += [b"env=" + _encode("environment variable", f"{name}={value}") for name, value in cfg.env]
    entries.append(b"cwd=" + _encode("working directory", cfg.cwd))
    entries.append(b"uid=%d" % cfg.uid)
    entries.append(b"gid=%d" % cfg.gid)
    entries.append(b"groups=" + ",".join(str(g) for g in cfg.groups).encode())
    entries.append(b"max_output=%d" % cfg.max_output)
    entries += [b"output=" + _encode("output path", path) for path in cfg.outputs]
    if cfg.network is not None:
        net = cfg.network
        try:
            ipaddress.IPv4Interface(net.address)
            ipaddress.IPv4Address(net.gateway)
            ipaddress.IPv4Address(net.dns)
        except ValueError as err:
            raise SpecError(f"invalid guest network settings: {err}") from None
        entries += [f"net_addr={net.address}".encode(), f"net_gw={net.gateway}".encode()]
        entries.append(f"net_dns={net.dns}".encode())
    return b"".join(entry + b"\0" for entry in entries)
