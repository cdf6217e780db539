import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bencher_runner.spec.errors import SpecError
from bencher_runner.spec.launch import DEFAULT_PATH, merge_env, resolve_command, resolve_launch, resolve_user
from tests.support.oci_builder import build_layout, file

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
bench:x:1000:1000:Bench User:/home/bench:/bin/sh
# comment
nohome:x:1001:1001:::/bin/sh
"""
GROUP = """root:x:0:
bench:x:1000:
wheel:x:10:bench,other
audio:x:29:other,bench
staff:x:50:
"""


class TestCommand:
    def test_entrypoint_plus_cmd(self) -> None:
        assert resolve_command(["/ep"], ["a", "b"], None, None) == ("/ep", "a", "b")

    def test_cmd_override_keeps_entrypoint(self) -> None:
        assert resolve_command(["/ep"], ["a"], None, ["x"]) == ("/ep", "x")

    def test_entrypoint_override_drops_image_cmd(self) -> None:
        assert resolve_command(["/ep"], ["a"], ["/other"], None) == ("/other",)

    def test_entrypoint_and_cmd_override(self) -> None:
        assert resolve_command(["/ep"], ["a"], ["/other"], ["y", ""]) == ("/other", "y", "")

    def test_cmd_only_image(self) -> None:
        assert resolve_command(None, ["/bin/true"], None, None) == ("/bin/true",)

    @pytest.mark.parametrize("ep,cmd", [(None, None), ([], []), (None, [])])
    def test_empty_is_a_clear_error(self, ep: list[str] | None, cmd: list[str] | None) -> None:
        with pytest.raises(SpecError, match="no ENTRYPOINT or CMD"):
            resolve_command(ep, cmd, None, None)

    def test_empty_program(self) -> None:
        with pytest.raises(SpecError, match="empty"):
            resolve_command(None, ["", "x"], None, None)


class TestEnv:
    def test_override_by_key_keeps_order(self) -> None:
        env = merge_env(["A=1", "B=2", "PATH=/bin"], {"B": "x=y z", "C": "3"}, home="/root")
        assert env == (("A", "1"), ("B", "x=y z"), ("PATH", "/bin"), ("C", "3"), ("HOME", "/root"))

    def test_default_path_and_home(self) -> None:
        env = dict(merge_env([], {}, home="/home/bench"))
        assert env["PATH"] == DEFAULT_PATH
        assert env["HOME"] == "/home/bench"

    def test_image_home_wins(self) -> None:
        assert dict(merge_env(["HOME=/x"], {}, home="/root"))["HOME"] == "/x"

    def test_entries_without_equals_are_ignored(self) -> None:
        assert dict(merge_env(["JUNK", "=v", "A=b=c"], {}, home="/"))["A"] == "b=c"
        assert "JUNK" not in dict(merge_env(["JUNK"], {}, home="/"))

    def test_bad_override_name(self) -> None:
        with pytest.raises(SpecError):
            merge_env([], {"A=B": "x"}, home="/")


class TestUser:
    def test_default_root(self) -> None:
        u = resolve_user("", PASSWD, GROUP)
        assert (u.uid, u.gid, u.groups, u.home) == (0, 0, (), "/root")

    def test_name(self) -> None:
        u = resolve_user("bench", PASSWD, GROUP)
        assert (u.uid, u.gid, u.home) == (1000, 1000, "/home/bench")
        assert u.groups == (10, 29)

    def test_numeric_uid_in_passwd(self) -> None:
        u = resolve_user("1000", PASSWD, GROUP)
        assert (u.uid, u.gid, u.groups) == (1000, 1000, (10, 29))

    def test_numeric_uid_unknown(self) -> None:
        u = resolve_user("4242", PASSWD, GROUP)
        assert (u.uid, u.gid, u.groups, u.home) == (4242, 0, (), "/")

    def test_uid_gid(self) -> None:
        u = resolve_user("4242:77", None, None)
        assert (u.uid, u.gid, u.groups) == (4242, 77, ())

    def test_name_group(self) -> None:
        u = resolve_user("bench:staff", PASSWD, GROUP)
        assert (u.uid, u.gid, u.groups) == (1000, 50, ())

    def test_uid_group_name(self) -> None:
        assert resolve_user("5:wheel", PASSWD, GROUP).gid == 10

    def test_empty_home_falls_back(self) -> None:
        assert resolve_user("nohome", PASSWD, GROUP).home == "/"

    def test_unknown_name(self) -> None:
        with pytest.raises(SpecError, match="'ghost' is not in the image's /etc/passwd"):
            resolve_user("ghost", PASSWD, GROUP)

    def test_unknown_name_without_passwd(self) -> None:
        with pytest.raises(SpecError, match="not in the image's /etc/passwd"):
            resolve_user("bench", None, None)

    def test_unknown_group(self) -> None:
        with pytest.raises(SpecError, match="'nogroup' is not in the image's /etc/group"):
            resolve_user("bench:nogroup", PASSWD, GROUP)

    def test_missing_user_part(self) -> None:
        with pytest.raises(SpecError):
            resolve_user(":10", PASSWD, GROUP)


def test_resolve_launch() -> None:
    launch = resolve_launch(
        image_entrypoint=["/bin/sh", "-c"],
        image_cmd=["echo hi"],
        image_env=["A=1"],
        image_working_dir="",
        image_user="bench",
        entrypoint=None,
        cmd=None,
        env={"A": "2"},
        passwd=PASSWD,
        group=GROUP,
    )
    assert launch.argv == ("/bin/sh", "-c", "echo hi")
    assert launch.cwd == "/"
    assert dict(launch.env)["A"] == "2"
    assert dict(launch.env)["HOME"] == "/home/bench"
    assert launch.user.uid == 1000


# --- hostile User values and tables: one line naming the value, never a ValueError --------------------

ODD_PASSWD = """weird:x:²:1000::/w:/bin/sh
huge:x:1099511627776:0::/h:/bin/sh
oddgid:x:1002:²::/o:/bin/sh
bench:x:1000:1000:Bench User:/home/bench:/bin/sh
"""
ODD_GROUP = """odd:x:²:bench
big:x:4294967296:bench
wheel:x:10:bench
"""


class TestHostileUser:
    @pytest.mark.parametrize(
        "spec,shown",
        [
            ("²", "'²'"),  # str.isdigit() is true for it, int() raises
            ("\u0661\u0662\u0663", "'\u0661\u0662\u0663'"),  # Arabic-Indic: int() gives 123
            ("\uff11\uff10\uff10\uff10", "'\uff11\uff10\uff10\uff10'"),  # fullwidth: int() gives 1000
            ("²:1000", "'²'"),
        ],
    )
    def test_non_ascii_digits_are_names_not_uids(self, spec: str, shown: str) -> None:
        with pytest.raises(SpecError, match=f"image user {shown} is not in the image's /etc/passwd"):
            resolve_user(spec, PASSWD, GROUP)

    @pytest.mark.parametrize("spec", ["1000:²", "bench:\u0661\u0660", "0:\uff11\uff10"])
    def test_non_ascii_digit_group_is_a_group_name(self, spec: str) -> None:
        with pytest.raises(SpecError, match="is not in the image's /etc/group"):
            resolve_user(spec, PASSWD, GROUP)

    @pytest.mark.parametrize(
        "spec,what",
        [
            ("4294967295", "uid 4294967295"),  # (uid_t)-1 means "no change" to setuid()
            ("4294967296", "uid 4294967296"),
            ("99999999999999999999999", "uid 99999999999999999999999"),
            ("1000:4294967296", "gid 4294967296"),
            ("0:" + "9" * 40, "gid " + "9" * 40),
        ],
    )
    def test_numeric_ids_out_of_range(self, spec: str, what: str) -> None:
        with pytest.raises(
            SpecError, match=rf"image user {spec!r}: {what} is out of range \(0\.\.4294967294\)"
        ):
            resolve_user(spec, PASSWD, GROUP)

    def test_largest_ids_accepted(self) -> None:
        u = resolve_user("4294967294:4294967294", None, None)
        assert (u.uid, u.gid) == (4294967294, 4294967294)

    @pytest.mark.parametrize("name", ["weird", "huge"])
    def test_passwd_entry_without_a_usable_uid(self, name: str) -> None:
        with pytest.raises(SpecError, match=f"image user '{name}' has uid .* in the image's /etc/passwd"):
            resolve_user(name, ODD_PASSWD, ODD_GROUP)

    def test_odd_rows_are_skipped_not_fatal(self) -> None:
        # the primary gid '²' is not a gid (runc's default 0), odd and big groups are not gids either
        assert resolve_user("oddgid", ODD_PASSWD, ODD_GROUP).gid == 0
        u = resolve_user("bench", ODD_PASSWD, ODD_GROUP)
        assert (u.uid, u.gid, u.groups) == (1000, 1000, (10,))
        assert resolve_user("1000", ODD_PASSWD, ODD_GROUP).uid == 1000

    @pytest.mark.parametrize("group", ["odd", "big"])
    def test_named_group_without_a_usable_gid(self, group: str) -> None:
        with pytest.raises(SpecError, match=f"image group '{group}' has gid .* in the image's /etc/group"):
            resolve_user(f"bench:{group}", ODD_PASSWD, ODD_GROUP)


class TestHostileLaunch:
    def _launch(self, **kw: object) -> object:
        args: dict[str, object] = {
            "image_entrypoint": None,
            "image_cmd": ["/bin/true"],
            "image_env": [],
            "image_working_dir": "/",
            "image_user": "",
            "entrypoint": None,
            "cmd": None,
            "env": {},
            "passwd": None,
            "group": None,
        }
        return resolve_launch(**{**args, **kw})  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        "kw,match",
        [
            ({"cmd": ["/bin/sh", "a\x00b"]}, r"command argument 1 'a\\x00b' contains a NUL byte"),
            ({"entrypoint": ["\x00"]}, r"command argument 0 '\\x00' contains a NUL byte"),
            ({"image_cmd": ["/bin/echo", "\ud800"]}, r"command argument 1 '\\ud800' is not valid Unicode"),
            ({"image_working_dir": "rel"}, r"working directory 'rel' is not an absolute path"),
            ({"image_working_dir": "/a/.."}, r"working directory '/a/\.\.' has a '\.\.' component"),
            ({"image_working_dir": "/\x00"}, r"working directory '/\\x00' contains a NUL byte"),
            ({"image_env": ["A=\x00"]}, r"environment entry 'A=\\x00' contains a NUL byte"),
            ({"env": {"A": "\ud800"}}, r"environment variable 'A' has a value that is not valid Unicode"),
        ],
    )
    def test_values_the_guest_cannot_take(self, kw: dict[str, object], match: str) -> None:
        with pytest.raises(SpecError, match=match) as err:
            self._launch(**kw)
        str(err.value).encode()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "config,error",
    [
        (
            {"User": "²"},
            "image user '²' is not in the image's /etc/passwd; use a numeric uid or add the user",
        ),
        ({"User": "4294967296"}, "image user '4294967296': uid 4294967296 is out of range (0..4294967294)"),
        ({"WorkingDir": "/w\x00"}, "image config field config.WorkingDir: '/w\\x00' contains a NUL byte"),
    ],
)
def test_runner_run_exits_2_with_one_line(tmp_path: Path, config: dict[str, str], error: str) -> None:
    """`runner run` maps these to exit 2 and one line (it was exit 1 with a ValueError traceback)."""
    layout = tmp_path / "img"
    build_layout(layout, [[file("etc/passwd", PASSWD)]], {"Cmd": ["/bin/true"], **config})
    argv = ["run", "--no-tuning", "--sandbox", "none", "--json", "--image", str(layout)]
    proc = subprocess.run(
        [sys.executable, "-m", "bencher_runner", *argv],
        capture_output=True,
        timeout=120,
        env={**os.environ, "BENCHER_RUNNER_CACHE_DIR": str(tmp_path / "cache")},
    )
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    text = json.loads(proc.stdout)["error"]
    assert text.startswith(error) and "\n" not in text, text
