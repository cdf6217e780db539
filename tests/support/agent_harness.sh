#!/usr/bin/env bash
# Boot the guest agent (guest/agent.c) by hand in a QEMU microVM and decode its output disk.
# Not used by CI: for working on the agent without the rest of the runner.
#
#   tests/support/agent_harness.sh [-m MAX_OUTPUT] [-u UID] [-g GID] [-G GROUPS] [-C CWD]
#       [-e NAME=VALUE]... [-o OUTPUT_PATH]... -- ARGV...
#
# The rootfs is busybox (/bin/busybox + applet symlinks) plus /data/present.txt and /data/adir.
# Work files (agent, initramfs, root.img, out.img, serial.log) live in $WORK (default
# /tmp/agent-harness). Needs: gcc, cpio, mkfs.ext4, qemu-system-x86_64, /bin/busybox, and a Debian
# cloud kernel unpacked at $KROOT (default /tmp/k/x).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=$REPO/.venv/bin/python
WORK=${WORK:-/tmp/agent-harness}
KROOT=${KROOT:-/tmp/k/x}
KVER=${KVER:-6.1.0-56-cloud-amd64}
MODS=$KROOT/lib/modules/$KVER/kernel

max_output=1048576 uid=0 gid=0 groups="" cwd=/ envs=() outputs=()
while getopts "m:u:g:G:C:e:o:" opt; do
	case $opt in
	m) max_output=$OPTARG ;;
	u) uid=$OPTARG ;;
	g) gid=$OPTARG ;;
	G) groups=$OPTARG ;;
	C) cwd=$OPTARG ;;
	e) envs+=("$OPTARG") ;;
	o) outputs+=("$OPTARG") ;;
	*) exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: $0 [options] -- ARGV..." >&2; exit 2; }
mkdir -p "$WORK"

# Agent + base initramfs, rebuilt when agent.c changes.
if [ ! -e "$WORK/base.cpio" ] || [ "$REPO/guest/agent.c" -nt "$WORK/base.cpio" ]; then
	gcc -static -Os -Wall -Wextra -Werror -o "$WORK/agent" "$REPO/guest/agent.c"
	rm -rf "$WORK/initrd" && mkdir -p "$WORK/initrd/bencher/modules" "$WORK/initrd"/{dev,proc,sys}
	cp "$WORK/agent" "$WORK/initrd/init"
	i=1
	for m in virtio/virtio_ring virtio/virtio virtio/virtio_mmio block/virtio_blk; do
		cp "$MODS/drivers/$m.ko" "$WORK/initrd/bencher/modules/0$i-$(basename $m).ko"
		i=$((i + 1))
	done
	(cd "$WORK/initrd" && find . | cpio -o -H newc --quiet >"$WORK/base.cpio")
fi

# Root filesystem (fresh each run: the guest writes to it).
rm -rf "$WORK/tree" && mkdir -p "$WORK/tree"/{bin,data/adir,etc,tmp}
cp /bin/busybox "$WORK/tree/bin/busybox"
for applet in sh id printf echo cat env pwd head yes ls sleep true false dd; do
	ln -s busybox "$WORK/tree/bin/$applet"
done
echo "present content" >"$WORK/tree/data/present.txt"
printf 'root:x:0:0::/:/bin/sh\nbench:x:1000:1000::/tmp:/bin/sh\n' >"$WORK/tree/etc/passwd"
mkfs.ext4 -q -F -d "$WORK/tree" "$WORK/root.img" 64M

# Job config (second cpio archive) and output disk, through the runner's own Python code.
ARGS_FILE=$WORK/job.args
{
	printf '%s\0' "$max_output" "$uid" "$gid" "$groups" "$cwd"
	printf '%s\0' "${#envs[@]}" ${envs[@]+"${envs[@]}"} "${#outputs[@]}" ${outputs[@]+"${outputs[@]}"} "$@"
} >"$ARGS_FILE"
"$PY" - "$ARGS_FILE" "$WORK" <<'EOF'
import sys
from pathlib import Path

from bencher_runner.sandbox.agentconfig import AgentConfig, encode_agent_config
from bencher_runner.sandbox.initramfs import job_archive
from bencher_runner.sandbox.outputdisk import create_output_disk

fields = Path(sys.argv[1]).read_bytes().split(b"\0")[:-1]
items = [f.decode(errors="surrogateescape") for f in fields]
max_output, uid, gid, groups, cwd, nenv, *rest = items
envs, rest = rest[: int(nenv)], rest[int(nenv) :]
outputs, argv = rest[1 : 1 + int(rest[0])], rest[1 + int(rest[0]) :]
cfg = AgentConfig(
    argv=tuple(argv),
    env=(("PATH", "/bin"), *(tuple(e.split("=", 1)) for e in envs)),  # type: ignore[misc]
    cwd=cwd,
    uid=int(uid),
    gid=int(gid),
    groups=tuple(int(g) for g in groups.split(",") if g),
    max_output=int(max_output),
    outputs=tuple(outputs),
)
work = Path(sys.argv[2])
(work / "job.cpio").write_bytes(job_archive(encode_agent_config(cfg)))
create_output_disk(work / "out.img", 64 << 20)
EOF
cat "$WORK/base.cpio" "$WORK/job.cpio" >"$WORK/initrd.cpio"

start=$(date +%s.%N)
timeout ${QEMU_TIMEOUT:-120} qemu-system-x86_64 -M microvm,x-option-roms=off,isa-serial=on,rtc=off -accel tcg -cpu max \
	-m 256 -smp "${SMP:-2}" -nodefaults -no-user-config -nographic -serial "file:$WORK/serial.log" \
	-kernel "$KROOT/boot/vmlinuz-$KVER" -initrd "$WORK/initrd.cpio" \
	-append "console=ttyS0 ${QUIET-quiet} panic=-1 reboot=t norandmaps nokaslr transparent_hugepage=never ${APPEND_EXTRA:-}" \
	-no-reboot \
	-drive id=root,file="$WORK/root.img",format=raw,if=none -device virtio-blk-device,drive=root \
	-drive id=out,file="$WORK/out.img",format=raw,if=none -device virtio-blk-device,drive=out ||
	echo "qemu exited with status $? (124: killed at the timeout)" >&2
end=$(date +%s.%N)
echo "boot+run: $(echo "$end - $start" | bc) s" >&2
grep -a "bencher-agent" "$WORK/serial.log" >&2 || true

"$PY" - "$WORK/out.img" "$max_output" <<'EOF'
import sys
from pathlib import Path

from bencher_runner.sandbox.outputdisk import read_output_disk

r = read_output_disk(Path(sys.argv[1]), max_output=int(sys.argv[2]))
show = {"stdout": r.stdout, "stderr": r.stderr} if len(r.stdout) < 4096 else {"stdout_len": len(r.stdout)}
print(f"agent={r.agent_version!r} start_ns={r.agent_start_ns} done={r.done} errors={r.errors}")
print(f"exit={r.exit} totals=({r.stdout_total}, {r.stderr_total}) {show}")
print(f"files={ {k: v[:200] for k, v in r.files.items()} } sizes={r.file_sizes} missing={r.missing}")
if r.exit and r.agent_start_ns is not None:
    print(f"command ran {(r.exit.end_ns - r.exit.start_ns) / 1e6:.1f} ms, "
          f"agent start at {r.agent_start_ns / 1e9:.3f} s, command start at {r.exit.start_ns / 1e9:.3f} s")
EOF
