import pytest

from bencher_runner.spec.errors import SpecError
from bencher_runner.spec.launch import DEFAULT_PATH, merge_env, resolve_command, resolve_launch, resolve_user

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
