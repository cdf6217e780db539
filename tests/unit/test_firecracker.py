"""The Firecracker backend by contract: requests vs Firecracker's OpenAPI schema, the client against a
fake API server, the process lifecycle against a fake `firecracker`, the jailer helpers; a real boot
where Firecracker and KVM exist.
"""

import copy
import errno
import http.server
import json
import os
import re
import socketserver
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from bencher_runner.sandbox import firecracker as fc
from bencher_runner.sandbox.firecracker import (
    ApiRequest,
    FirecrackerApi,
    FirecrackerVm,
    GuestFiles,
    JailerConfig,
    boot_requests,
    find_firecracker,
    firecracker_cmdline,
    jailer_argv,
    kvm_problem,
    prepare_jail,
)
from bencher_runner.sandbox.netns import JobNetwork
from bencher_runner.sandbox.network import user_nat
from bencher_runner.sandbox.vm import GUEST_CMDLINE, VmSpec
from bencher_runner.spec.errors import SandboxError

API_SPEC = Path("/work/shared/reference/firecracker-api.yaml")
REAL_KERNEL = Path.home() / ".cache" / "bencher-runner" / "kernel" / "vmlinuz"


def spec(**kw: Any) -> VmSpec:
    base: dict[str, Any] = dict(
        kernel=Path("/k/vmlinuz"), initrd=Path("/w/initrd.cpio"), rootfs=Path("/w/rootfs.ext4"),
        output_disk=Path("/w/output.img"), serial_log=Path("/w/serial.log"), vcpus=2, memory_mib=768,
        accel="kvm",
    )  # fmt: skip
    base.update(kw)
    return VmSpec(**base)


FILES = GuestFiles(
    kernel="/c/vmlinux", initrd="/w/initrd.cpio", rootfs="/w/rootfs.ext4", output_disk="/w/output.img",
    log="/w/firecracker.log", metrics="/w/metrics.json",
)  # fmt: skip


# ---- the schema contract ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api() -> dict[str, Any]:
    if not API_SPEC.is_file():
        pytest.skip(f"{API_SPEC} is absent")
    doc: dict[str, Any] = yaml.safe_load(API_SPEC.read_text())
    return doc


def closed(definitions: dict[str, Any]) -> dict[str, Any]:
    """Firecracker rejects unknown fields (serde deny_unknown_fields): close every object schema."""
    out = copy.deepcopy(definitions)
    for schema in out.values():
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
    return out


def validate(api: dict[str, Any], request: ApiRequest) -> str:
    """Validate the body against the matching operation's body schema; returns the path template."""
    for template, operations in api["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "([^/]+)", template) + "$"
        match = re.match(pattern, request.path)
        operation = operations.get(request.method.lower())
        if match and operation:
            body = next(p for p in operation["parameters"] if p["in"] == "body")
            schema = {**body["schema"], "definitions": closed(api["definitions"])}
            jsonschema.Draft4Validator(schema).validate(request.body)
            for name, value in zip(re.findall(r"\{([^}]+)\}", template), match.groups(), strict=True):
                assert request.body.get(name) == value, f"{request}: body {name} must match the path"
            return str(template)
    raise AssertionError(f"{request} is not an operation of the Firecracker API")


def tap_plan() -> Any:
    import ipaddress

    return JobNetwork("bencher-0000abcd", ipaddress.IPv4Network("100.64.0.0/30"), "9.9.9.9").plan


@pytest.mark.parametrize("vcpus", [1, 2, 8, 32])
@pytest.mark.parametrize("memory_mib", [128, 768, 4096, 65536])
@pytest.mark.parametrize("network", [False, True])
@pytest.mark.parametrize("metrics", [False, True])
def test_requests_match_the_schema(
    api: dict[str, Any], vcpus: int, memory_mib: int, network: bool, metrics: bool
) -> None:
    files = FILES if metrics else GuestFiles(**{**FILES.__dict__, "metrics": None})
    requests = boot_requests(
        spec(vcpus=vcpus, memory_mib=memory_mib, network=tap_plan() if network else None), files, "Info"
    )
    templates = [validate(api, r) for r in requests]
    expected = ["/logger", *(["/metrics"] if metrics else []), "/machine-config", "/boot-source"]
    expected += ["/drives/{drive_id}", "/drives/{drive_id}"]
    expected += ["/network-interfaces/{iface_id}"] if network else []
    assert templates == [*expected, "/actions"]
    assert all(r.method == "PUT" for r in requests)
    assert requests[-1].body == {"action_type": "InstanceStart"}
    machine = next(r for r in requests if r.path == "/machine-config").body
    assert machine == {"vcpu_count": vcpus, "mem_size_mib": memory_mib, "smt": False}


def test_boot_source_and_drives() -> None:
    requests = {r.path: r.body for r in boot_requests(spec(), FILES)}
    boot = requests["/boot-source"]
    assert boot["kernel_image_path"] == "/c/vmlinux" and boot["initrd_path"] == "/w/initrd.cpio"
    words = boot["boot_args"].split()
    assert "reboot=k" in words and "reboot=t" not in words
    assert set(GUEST_CMDLINE.split()) - {"reboot=t"} <= set(words)
    root, out = requests["/drives/rootfs"], requests["/drives/output"]
    assert root["path_on_host"] == "/w/rootfs.ext4" and out["path_on_host"] == "/w/output.img"
    assert root["is_root_device"] is False and out["is_root_device"] is False  # booted from the initramfs
    assert root["is_read_only"] is False and out["is_read_only"] is False
    assert (
        requests["/logger"]["level"] == "Warning" and requests["/logger"]["log_path"] == "/w/firecracker.log"
    )


def test_cmdline_keeps_tsc_khz() -> None:
    line = firecracker_cmdline(GUEST_CMDLINE + " tsc_early_khz=2400000")
    assert line.split().count("reboot=k") == 1 and "tsc_early_khz=2400000" in line.split()


def test_network_uses_the_tap_device() -> None:
    net = next(r for r in boot_requests(spec(network=tap_plan()), FILES) if "network" in r.path)
    assert net.path == "/network-interfaces/eth0"
    assert net.body["host_dev_name"] == "tap0" and net.body["iface_id"] == "eth0"


def test_user_mode_nat_is_refused() -> None:
    with pytest.raises(SandboxError, match="--network-mode tap"):
        boot_requests(spec(network=user_nat()), FILES)


@pytest.mark.parametrize("vcpus", [0, 33, 64, 255])
def test_vcpu_limit(vcpus: int) -> None:
    with pytest.raises(SandboxError, match=rf"1 to 32 vCPUs, {vcpus} requested"):
        boot_requests(spec(vcpus=vcpus), FILES)


def test_vcpu_limit_before_any_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = fake_binary(tmp_path)
    fake_setting(tmp_path, "FAKE_FC_RECORD", str(tmp_path / "requests.jsonl"))
    with pytest.raises(SandboxError, match="33 requested"):
        FirecrackerVm(spec(vcpus=33), tmp_path / "vmlinux", tmp_path, firecracker=binary)
    assert not (tmp_path / "requests.jsonl").exists()


def test_bad_log_level() -> None:
    with pytest.raises(SandboxError, match="log level"):
        boot_requests(spec(), FILES, "Verbose")  # type: ignore[arg-type]


# ---- finding the binary and KVM -----------------------------------------------------------------


def test_find_firecracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCHER_RUNNER_FIRECRACKER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxError, match=r"not installed: download a release .* --firecracker PATH"):
        find_firecracker()
    with pytest.raises(SandboxError, match="--firecracker"):
        find_firecracker(tmp_path / "missing")
    binary = fake_binary(tmp_path)
    assert find_firecracker(binary) == str(binary)
    monkeypatch.setenv("BENCHER_RUNNER_FIRECRACKER", str(binary))
    assert find_firecracker() == str(binary)
    monkeypatch.setenv("BENCHER_RUNNER_FIRECRACKER", str(tmp_path / "gone"))
    with pytest.raises(SandboxError, match="BENCHER_RUNNER_FIRECRACKER"):
        find_firecracker()


def test_kvm_problem(tmp_path: Path) -> None:
    assert "does not exist" in (kvm_problem(tmp_path / "kvm") or "")
    not_kvm = tmp_path / "kvm"
    not_kvm.write_bytes(b"")
    assert "not a KVM device" in (kvm_problem(not_kvm) or "")


def test_tcg_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="KVM only"):
        FirecrackerVm(spec(accel="tcg"), tmp_path / "vmlinux", tmp_path, firecracker=fake_binary(tmp_path))


# ---- the client against a fake API server -------------------------------------------------------


class FakeApi(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, Any]]
    faults: dict[str, tuple[int, bytes]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "uds"

    def _reply(self, code: int, body: bytes = b"") -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, None))
        self._reply(200, json.dumps({"app_name": "Firecracker", "id": "x", "state": "Not started"}).encode())

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"null")
        self.seen.append(("PUT", self.path, body))
        code, reply = self.faults.get(self.path, (204, b""))
        self._reply(code, reply)


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[tuple[Path, type[FakeApi]]]:
    handler = type("Handler", (FakeApi,), {"seen": [], "faults": {}})
    sock = tmp_path / "api.sock"
    server = UnixServer(str(sock), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield sock, handler
    server.shutdown()
    server.server_close()


def test_client_sends_every_request(fake_api: tuple[Path, type[FakeApi]]) -> None:
    sock, handler = fake_api
    client = FirecrackerApi(sock)
    assert client.describe()["app_name"] == "Firecracker"
    requests = boot_requests(spec(network=tap_plan()), FILES)
    for request in requests:
        client.send(request)
    client.close()
    assert handler.seen[1:] == [("PUT", r.path, r.body) for r in requests]


def test_error_becomes_sandbox_error_with_fault_message(fake_api: tuple[Path, type[FakeApi]]) -> None:
    sock, handler = fake_api
    fault = b'{"fault_message": "Invalid Memory Configuration: mem_size_mib"}'
    handler.faults["/machine-config"] = (400, fault)
    handler.faults["/boot-source"] = (500, b"not json")
    client = FirecrackerApi(sock)
    requests = {r.path: r for r in boot_requests(spec(), FILES)}
    with pytest.raises(SandboxError) as err:
        client.send(requests["/machine-config"])
    assert str(err.value) == (
        "Firecracker refused PUT /machine-config (HTTP 400): Invalid Memory Configuration: mem_size_mib"
    )
    with pytest.raises(SandboxError, match=r"PUT /boot-source \(HTTP 500\): not json"):
        client.send(requests["/boot-source"])


def test_unreachable_socket(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="Firecracker API request GET / failed"):
        FirecrackerApi(tmp_path / "none.sock").describe()


def test_socket_path_too_long(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="shorter --cache-dir"):
        FirecrackerApi(tmp_path / ("x" * 120) / "fc.sock")


# ---- the process lifecycle against a fake firecracker -------------------------------------------

FAKE_FIRECRACKER = r"""
import http.server, json, os, socketserver, sys, threading, time
args = sys.argv[1:]
sock = args[args.index("--api-sock") + 1]
with open(os.path.join(os.path.dirname(sys.argv[0]), "fake.json")) as f:
    conf = json.load(f)  # not the environment: a VMM gets an empty one
record = conf["FAKE_FC_RECORD"]
with open(record, "a") as f:
    f.write(json.dumps({"argv": args, "env": dict(os.environ)}) + "\n")
sys.stderr.write("fake firecracker starting\n"); sys.stderr.flush()
time.sleep(0.2)  # the client must wait for the socket
def leave(delay):
    time.sleep(delay); os._exit(0)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def address_string(self): return "uds"
    def reply(self, code, body=b""):
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply(200, b'{"app_name": "Firecracker", "id": "x", "state": "Not started", "vmm_version": "0"}')
    def do_PUT(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(record, "a") as f:
            f.write(json.dumps({"path": self.path, "body": body}) + "\n")
        if self.path == conf.get("FAKE_FC_FAIL"):
            return self.reply(400, b'{"fault_message": "fake fault"}')
        self.reply(204)
        if self.path == "/logger":
            with open(body["log_path"], "a") as log:
                log.write("[fake] logger configured\n")
        action = body.get("action_type")
        if action == "InstanceStart":
            print("Linux version fake (serial)", flush=True)
            if conf.get("FAKE_FC_GUEST_EXITS"):
                threading.Thread(target=leave, args=(0.3,)).start()
        elif action == "SendCtrlAltDel" and not conf.get("FAKE_FC_IGNORE_CAD"):
            threading.Thread(target=leave, args=(0.1,)).start()
class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
S(sock, H).serve_forever()
"""


def fake_setting(directory: Path, name: str, value: str) -> None:
    """What the fake firecracker in ``directory`` reads (its environment is empty)."""
    conf_path = directory / "fake.json"
    conf = json.loads(conf_path.read_text()) if conf_path.exists() else {}
    conf_path.write_text(json.dumps({**conf, name: value}))


def fake_binary(directory: Path) -> Path:
    path = directory / "firecracker"
    if not path.exists():
        path.write_text(f"#!{sys.executable}\n{FAKE_FIRECRACKER}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_fc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setattr(fc, "require_kvm", lambda device=None: None)
    record = tmp_path / "requests.jsonl"
    fake_setting(tmp_path, "FAKE_FC_RECORD", str(record))
    work = tmp_path / "work"
    work.mkdir()
    return fake_binary(tmp_path), record


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_vm_boots_and_guest_exit_ends_it(
    fake_fc: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary, record = fake_fc
    fake_setting(tmp_path, "FAKE_FC_GUEST_EXITS", "1")
    vm_spec = spec(serial_log=tmp_path / "serial.log")
    with FirecrackerVm(
        vm_spec, tmp_path / "vmlinux", tmp_path / "work", firecracker=binary, vm_id="t1"
    ) as vm:
        assert vm.wait(time.monotonic() + 10) == 0
        vm.kill()  # a no-op now
    seen = records(record)
    argv = seen[0]["argv"]
    assert argv == ["--api-sock", str(tmp_path / "work" / "fc.sock"), "--id", "t1", "--level", "Warning"]
    assert [r["path"] for r in seen[1:]] == [r.path for r in vm.requests]
    assert seen[-1]["body"] == {"action_type": "InstanceStart"}
    assert "Linux version fake" in (tmp_path / "serial.log").read_text()
    assert "fake firecracker starting" in vm.log() and "logger configured" in vm.log()
    assert not (tmp_path / "work" / "fc.sock").exists()


def test_kill_sends_ctrl_alt_del(fake_fc: tuple[Path, Path], tmp_path: Path) -> None:
    binary, record = fake_fc
    with FirecrackerVm(
        spec(serial_log=tmp_path / "s.log"), tmp_path / "k", tmp_path / "work", firecracker=binary
    ) as vm:
        assert vm.wait(time.monotonic() + 0.3) is None  # still "running"
        t0 = time.monotonic()
        vm.kill()
        assert time.monotonic() - t0 < 1.5
        assert vm.wait(time.monotonic()) == 0  # it left on its own after Ctrl-Alt-Del
    assert records(record)[-1]["body"] == {"action_type": "SendCtrlAltDel"}


def test_kill_falls_back_to_sigkill(
    fake_fc: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary, _ = fake_fc
    fake_setting(tmp_path, "FAKE_FC_IGNORE_CAD", "1")
    with FirecrackerVm(
        spec(serial_log=tmp_path / "s.log"), tmp_path / "k", tmp_path / "work", firecracker=binary
    ) as vm:
        t0 = time.monotonic()
        vm.kill()
        assert fc.SHUTDOWN_WAIT_S <= time.monotonic() - t0 < fc.SHUTDOWN_WAIT_S + 2
        assert vm.wait(time.monotonic()) == -9
    assert vm.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(vm.pid, 0)


def test_refused_request_stops_the_vm(
    fake_fc: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary, record = fake_fc
    fake_setting(tmp_path, "FAKE_FC_FAIL", "/drives/output")
    vm = FirecrackerVm(
        spec(serial_log=tmp_path / "s.log"), tmp_path / "k", tmp_path / "work", firecracker=binary
    )
    with pytest.raises(SandboxError, match=r"refused PUT /drives/output \(HTTP 400\): fake fault"):
        vm.__enter__()
    assert vm.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(vm.pid, 0)
    assert "InstanceStart" not in record.read_text()


def test_early_exit_is_reported(fake_fc: tuple[Path, Path], tmp_path: Path) -> None:
    broken = tmp_path / "firecracker-broken"
    broken.write_text("#!/bin/sh\necho 'Error: bad --level' >&2\nexit 1\n")
    broken.chmod(0o755)
    vm = FirecrackerVm(
        spec(serial_log=tmp_path / "s.log"), tmp_path / "k", tmp_path / "work", firecracker=broken
    )
    with pytest.raises(SandboxError, match=r"exited with status 1 before its API was up: Error: bad --level"):
        vm.__enter__()


def test_missing_kvm_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fc, "KVM_DEVICE", tmp_path / "kvm")
    monkeypatch.setattr(fc, "kvm_problem", lambda device=None: f"{tmp_path / 'kvm'} does not exist")
    vm = FirecrackerVm(
        spec(serial_log=tmp_path / "s.log"), tmp_path / "k", tmp_path, firecracker=fake_binary(tmp_path)
    )
    with pytest.raises(SandboxError, match=r"Firecracker needs KVM: .* does not exist; use --sandbox qemu"):
        vm.__enter__()


# ---- the jailer ---------------------------------------------------------------------------------


def jail_config(tmp_path: Path, **kw: Any) -> JailerConfig:
    base: dict[str, Any] = dict(
        jailer="/usr/bin/jailer", uid=os.getuid(), gid=os.getgid(), chroot_base=tmp_path / "jail"
    )
    base.update(kw)
    return JailerConfig(**base)


def test_jailer_argv(tmp_path: Path) -> None:
    config = jail_config(tmp_path, uid=1234, gid=1235, netns="bencher-0000abcd", cpuset="2-3")
    argv = jailer_argv(config, "/opt/fc/firecracker", "vm-1", "/run/firecracker.socket", "Info")
    assert argv[0] == "/usr/bin/jailer"
    opts = argv[1 : argv.index("--")]
    pairs = list(zip(opts[::2], opts[1::2], strict=True))
    assert ("--id", "vm-1") in pairs and ("--exec-file", "/opt/fc/firecracker") in pairs
    assert ("--uid", "1234") in pairs and ("--gid", "1235") in pairs
    assert ("--chroot-base-dir", str(tmp_path / "jail")) in pairs
    assert ("--netns", "/var/run/netns/bencher-0000abcd") in pairs
    assert ("--cgroup-version", "2") in pairs and ("--cgroup", "cpuset.cpus=2-3") in pairs
    assert argv[argv.index("--") + 1 :] == ["--api-sock", "/run/firecracker.socket", "--level", "Info"]
    plain = jailer_argv(jail_config(tmp_path), "/opt/firecracker", "vm-1", "/run/firecracker.socket", "Info")
    assert "--netns" not in plain and "--cgroup" not in plain


def test_jailer_argv_checks(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="letters, digits and hyphens"):
        jailer_argv(jail_config(tmp_path), "/opt/firecracker", "../x", "/s", "Info")
    with pytest.raises(SandboxError, match="contains 'firecracker'"):
        jailer_argv(jail_config(tmp_path), "/opt/fc-v1.16", "vm-1", "/s", "Info")


def job_files(tmp_path: Path) -> tuple[VmSpec, Path]:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    for name in ("vmlinux", "initrd.cpio", "rootfs.ext4", "output.img"):
        (work / name).write_bytes(name.encode())
    vm_spec = spec(
        initrd=work / "initrd.cpio", rootfs=work / "rootfs.ext4", output_disk=work / "output.img",
        serial_log=work / "serial.log",
    )  # fmt: skip
    return vm_spec, work / "vmlinux"


def test_prepare_jail_links_and_cleans_up(tmp_path: Path) -> None:
    vm_spec, vmlinux = job_files(tmp_path)
    uid = 4321 if os.geteuid() == 0 else os.getuid()
    config = jail_config(tmp_path, uid=uid, gid=uid if os.geteuid() == 0 else os.getgid())
    layout = prepare_jail(config, "/opt/firecracker", "vm-1", vm_spec, vmlinux, metrics=True)
    assert layout.root == tmp_path / "jail" / "firecracker" / "vm-1" / "root"
    for jail_path, original in (
        (layout.files.kernel, vmlinux), (layout.files.initrd, vm_spec.initrd),
        (layout.files.rootfs, vm_spec.rootfs), (layout.files.output_disk, vm_spec.output_disk),
    ):  # fmt: skip
        assert jail_path.startswith("/")
        assert layout.host_path(jail_path).stat().st_ino == original.stat().st_ino  # hard links
    assert layout.host_path(layout.files.rootfs).stat().st_uid == uid  # the jailed user writes the disks
    assert vmlinux.stat().st_uid == os.getuid()  # the shared kernel is not handed over
    assert layout.host_path(layout.files.log).exists() and layout.files.metrics is not None
    assert layout.host_path(layout.files.metrics).exists() and (layout.root / "run").is_dir()
    requests = boot_requests(vm_spec, layout.files)
    boot = next(r for r in requests if r.path == "/boot-source").body
    assert boot["kernel_image_path"] == "/vmlinux"
    with pytest.raises(SandboxError, match="already exists"):
        prepare_jail(config, "/opt/firecracker", "vm-1", vm_spec, vmlinux)
    layout.cleanup()
    assert not (tmp_path / "jail" / "firecracker" / "vm-1").exists()
    assert vm_spec.output_disk.read_bytes() == b"output.img"


def test_prepare_jail_across_filesystems_copies_disks_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm_spec, vmlinux = job_files(tmp_path)

    def no_link(src: Any, dst: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    layout = prepare_jail(jail_config(tmp_path), "/opt/firecracker", "vm-2", vm_spec, vmlinux)
    assert layout.host_path(layout.files.kernel).read_bytes() == b"vmlinux"
    layout.host_path(layout.files.output_disk).write_bytes(b"results from the guest")
    layout.cleanup()
    assert vm_spec.output_disk.read_bytes() == b"results from the guest"
    assert not layout.instance_dir.exists()


# ---- a real boot, where Firecracker and KVM exist -----------------------------------------------


def empty_cpio() -> bytes:
    name = b"TRAILER!!!\0"
    header = b"070701" + b"%08X" % 0 * 11 + b"%08X" % len(name) + b"%08X" % 0
    data = header + name
    return data + b"\0" * (-len(data) % 4) + b"\0" * 512


def test_real_firecracker_boot(tmp_path: Path) -> None:
    try:
        binary = find_firecracker()
    except SandboxError as err:
        pytest.skip(f"no Firecracker binary: {err}")
    problem = kvm_problem()
    if problem:
        pytest.skip(f"KVM unusable: {problem}")
    if not REAL_KERNEL.is_file():
        pytest.skip(f"{REAL_KERNEL} is absent (run `make setup`)")
    from bencher_runner.sandbox.vmlinux import extract_vmlinux

    vmlinux = extract_vmlinux(REAL_KERNEL, tmp_path / "vmlinux")
    (tmp_path / "initrd.cpio").write_bytes(empty_cpio())  # no /init: the kernel panics and reboots
    for disk in ("rootfs.ext4", "output.img"):
        with (tmp_path / disk).open("wb") as f:
            f.truncate(1 << 20)
    vm_spec = spec(
        initrd=tmp_path / "initrd.cpio", rootfs=tmp_path / "rootfs.ext4", output_disk=tmp_path / "output.img",
        serial_log=tmp_path / "serial.log", vcpus=1, memory_mib=256,
    )  # fmt: skip
    with FirecrackerVm(vm_spec, vmlinux, tmp_path, firecracker=binary) as vm:
        status = vm.wait(time.monotonic() + 60)
    serial = vm_spec.serial_log.read_text(errors="replace")
    assert status is not None, f"the guest did not reboot within 60 s\n{serial[-2000:]}\n{vm.log()}"
    assert "Linux version" in serial and "Kernel panic" in serial, serial[-2000:]
