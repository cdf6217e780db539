"""Click parameter types that refuse what no command can use, where it is parsed: so a bad value is
one line naming the option and exit 2, never a traceback from deep inside (a NUL byte in a path
raised ValueError from os.stat) or a job that fails later for a reason the flag could have given.
"""

from typing import Any

import click

INT32_MAX = 2**31 - 1


class SafePath(click.Path):
    """A path that is not empty and holds no NUL byte."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            if not value.strip():
                self.fail("a path cannot be empty", param, ctx)
            if "\0" in value:
                self.fail(f"{value!r} contains a NUL byte", param, ctx)
        return super().convert(value, param, ctx)


class Text(click.ParamType[str]):
    """A string without NUL (no C string can carry one); optionally not empty, without whitespace or
    control characters. ``secret``: the value is never echoed in the error."""

    name = "text"

    def __init__(
        self, *, empty: bool = True, spaces: bool = True, controls: bool = True, secret: bool = False
    ):
        self.empty, self.spaces, self.controls, self.secret = empty, spaces, controls, secret

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        shown = "the value" if self.secret else repr(value)
        if "\0" in value:
            self.fail(f"{shown} contains a NUL byte", param, ctx)
        if not self.empty and not value.strip():
            self.fail("it cannot be empty", param, ctx)
        if not self.spaces and any(c.isspace() for c in value):
            self.fail(f"{shown} contains whitespace", param, ctx)
        if not self.controls and any(ord(c) < 32 or ord(c) == 127 for c in value):
            self.fail(f"{shown} contains a control character", param, ctx)
        return value


class HttpUrl(click.ParamType[str]):
    """An http(s):// URL with a host (the Bencher API)."""

    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import httpx  # only for `runner daemon`

        if not isinstance(value, str):
            return value
        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, TypeError, ValueError) as err:
            self.fail(f"{value!r} is not a URL: {err}", param, ctx)
        if url.scheme not in ("http", "https") or not url.host or any(c.isspace() for c in value):
            self.fail(f"{value!r}: expected http(s)://HOST[:PORT], e.g. https://api.bencher.dev", param, ctx)
        return value
