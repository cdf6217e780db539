"""A static busybox root tree (Debian's busybox-static): the smallest image that boots a command."""

import shutil
from pathlib import Path

APPLETS = [
    *("sh", "echo", "printf", "cat", "id", "pwd", "env", "nproc", "df", "ls", "sleep", "kill", "head"),
    *("grep", "awk", "true", "false", "wc", "dd", "yes", "wget", "tr", "mkdir", "ln"),
]
PASSWD = "root:x:0:0:root:/root:/bin/sh\nbench:x:1000:1000:Bench:/home/bench:/bin/sh\n"
GROUP = "root:x:0:\nbench:x:1000:\nwheel:x:10:bench\n"


def busybox_tree(root: Path) -> Path:
    """/bin/busybox with its applet links, /etc/passwd and /etc/group (root and bench), /tmp."""
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    (root / "tmp").mkdir(mode=0o1777)
    return root
