"""What the guest runs: command, environment, working dir and user, by Docker's rules.

Pure functions over the image config, the job's overrides and the image's own /etc/passwd and
/etc/group texts, so that every rule is unit-tested without a VM:

- command = entrypoint + cmd; an entrypoint override drops the image's CMD; empty -> error.
- env = image ``Env``, then job env overrides by key (order: image order, new keys appended);
  PATH gets Docker's default when absent, HOME comes from the user's passwd entry (else ``/``, or
  ``/root`` for root) when absent.
- working dir = image ``WorkingDir``, else ``/``.
- user = image ``User``: ``uid``, ``uid:gid``, ``name``, ``name:group``, ``uid:group``, ``name:gid``
  resolved against the image's files; else root. Supplementary groups come from /etc/group.

Everything here comes from the image (or the job) and is untrusted: an id is ASCII digits only
(``str.isdigit`` is true for ``²``, which ``int`` refuses, and for ``١٢٣``, which it reads as 123) and
at most :data:`MAX_ID`; a string the guest cannot take (NUL, a lone surrogate) is refused. Each
problem is one :class:`SpecError` line with the value quoted by ``repr`` (escaped, so always UTF-8).
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bencher_runner.spec.errors import SpecError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ID = 2**32 - 2  # uid_t/gid_t are u32 in the guest and (u32)-1 means "no change" to set*id()
_ID_RE = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


@dataclass(frozen=True)
class Launch:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    user: User


def resolve_command(
    image_entrypoint: Sequence[str] | None,
    image_cmd: Sequence[str] | None,
    entrypoint: Sequence[str] | None,
    cmd: Sequence[str] | None,
) -> tuple[str, ...]:
    """Docker's entrypoint/cmd merge. ``None`` means "not overridden"."""
    if entrypoint is not None:
        argv = [*entrypoint, *(cmd or [])]
    else:
        argv = [*(image_entrypoint or []), *(cmd if cmd is not None else (image_cmd or []))]
    if not argv:
        raise SpecError(
            "the image has no ENTRYPOINT or CMD and none was given; "
            "pass --entrypoint or --cmd (or set one in the image)"
        )
    if argv[0] == "":
        raise SpecError("the command's first element (the program) is empty; give a program to run")
    for i, arg in enumerate(argv):
        _check_text(f"command argument {i}", arg)
    return tuple(argv)


def _unfit(value: str) -> str | None:
    """Why the guest cannot take ``value``, or None."""
    if "\0" in value:
        return "contains a NUL byte, which the guest cannot pass on"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it holds a lone surrogate)"
    return None


def _check_text(what: str, value: str) -> None:
    """SpecError naming ``what`` and the (escaped) value unless the guest can take ``value``."""
    why = _unfit(value)
    if why is not None:
        raise SpecError(f"{what} {value!r:.200} {why}")


def parse_env_entry(entry: str) -> tuple[str, str] | None:
    """``NAME=VALUE`` -> pair; image entries without ``=`` are ignored (as Docker does)."""
    name, sep, value = entry.partition("=")
    if not sep or not name:
        return None
    return name, value


def merge_env(
    image_env: Sequence[str], overrides: Mapping[str, str], *, home: str
) -> tuple[tuple[str, str], ...]:
    merged: dict[str, str] = {}
    for entry in image_env:
        _check_text("environment entry", entry)
        pair = parse_env_entry(entry)
        if pair is not None:
            merged[pair[0]] = pair[1]
    for name, value in overrides.items():
        if not name or "=" in name or "\0" in name:
            raise SpecError(
                f"invalid environment variable name {name!r}; use NAME=VALUE with a non-empty NAME"
            )
        _check_text("environment variable name", name)
        why = _unfit(value)
        if why is not None:  # the value may be a secret: not shown
            raise SpecError(f"environment variable {name!r} has a value that {why}")
        merged[name] = value
    merged.setdefault("PATH", DEFAULT_PATH)
    merged.setdefault("HOME", home)
    return tuple(merged.items())


def _parse_table(text: str, min_fields: int) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) >= min_fields:
            rows.append(fields)
    return rows


def _as_id(text: str) -> int | None:
    """The id an /etc/passwd or /etc/group field holds, or None (not ASCII digits, out of range)."""
    if not _ID_RE.fullmatch(text):
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _spec_id(text: str, what: str, spec: str) -> int | None:
    """The id of a numeric ``User`` part; None for a name; SpecError when out of range."""
    if not _ID_RE.fullmatch(text):
        return None
    value = int(text)
    if value > MAX_ID:
        raise SpecError(f"image user {spec!r}: {what} {text} is out of range (0..{MAX_ID}); use a smaller id")
    return value


def resolve_user(spec: str, passwd: str | None, group: str | None) -> User:
    """Resolve an image ``User`` string against the image's /etc/passwd and /etc/group texts."""
    passwd_rows = _parse_table(passwd or "", 7)
    group_rows = _parse_table(group or "", 4)
    spec = spec.strip()
    user_part, _, group_part = spec.partition(":")
    if not spec:
        user_part = "0"
    elif not user_part:
        raise SpecError(f"invalid image user {spec!r}; expected uid, uid:gid, name or name:group")

    entry = None
    uid = _spec_id(user_part, "uid", spec)
    for row in passwd_rows:
        if (uid is None and row[0] == user_part) or (uid is not None and _as_id(row[2]) == uid):
            entry = row
            break
    if uid is None:
        if entry is None:
            raise SpecError(
                f"image user {user_part!r} is not in the image's /etc/passwd; "
                "use a numeric uid or add the user to the image"
            )
        uid = _as_id(entry[2])
        if uid is None:
            raise SpecError(
                f"image user {user_part!r} has uid {entry[2]!r:.40} in the image's /etc/passwd, which is "
                f"not a number from 0 to {MAX_ID}; fix the image's /etc/passwd or use a numeric uid"
            )
    name = entry[0] if entry else None
    home = entry[5] if entry and entry[5] else ("/root" if uid == 0 else "/")

    if group_part:
        gid = _spec_id(group_part, "gid", spec)
        if gid is None:
            match = next((row for row in group_rows if row[0] == group_part), None)
            if match is None:
                raise SpecError(
                    f"image group {group_part!r} is not in the image's /etc/group; "
                    "use a numeric gid or add the group to the image"
                )
            gid = _as_id(match[2])
            if gid is None:
                raise SpecError(
                    f"image group {group_part!r} has gid {match[2]!r:.40} in the image's /etc/group, which "
                    f"is not a number from 0 to {MAX_ID}; fix the image's /etc/group or use a numeric gid"
                )
    else:
        primary = _as_id(entry[3]) if entry else None
        gid = primary if primary is not None else 0  # runc's default for a uid without a passwd entry

    groups: list[int] = []
    if name is not None and not group_part:
        for row in group_rows:
            members = [m for m in row[3].split(",") if m]
            row_gid = _as_id(row[2])
            if name in members and row_gid is not None and row_gid != gid and row_gid not in groups:
                groups.append(row_gid)
    return User(uid=uid, gid=gid, groups=tuple(groups), home=home)


def resolve_launch(
    *,
    image_entrypoint: Sequence[str] | None,
    image_cmd: Sequence[str] | None,
    image_env: Sequence[str],
    image_working_dir: str,
    image_user: str,
    entrypoint: Sequence[str] | None,
    cmd: Sequence[str] | None,
    env: Mapping[str, str],
    passwd: str | None,
    group: str | None,
) -> Launch:
    argv = resolve_command(image_entrypoint, image_cmd, entrypoint, cmd)
    _check_text("image user", image_user)
    user = resolve_user(image_user, passwd, group)
    cwd = image_working_dir or "/"
    _check_text("working directory", cwd)
    if not cwd.startswith("/"):  # imageconfig refuses these already; this module trusts no caller
        raise SpecError(f"working directory {cwd!r} is not an absolute path; set an absolute WORKDIR")
    if ".." in cwd.split("/"):
        raise SpecError(f"working directory {cwd!r} has a '..' component; set a WORKDIR without '..'")
    return Launch(argv=argv, env=merge_env(image_env, env, home=user.home), cwd=cwd, user=user)
