"""The OCI image config blob, reduced to what the runner needs to start the benchmark.

The blob carries the default command, environment, working directory and user (Docker-cased keys
inside ``config``). Parsing is tolerant of everything the runner does not use (unknown fields are
ignored, JSON ``null`` means "not set") and strict about the shape of what it does use, and about
values the guest cannot take: a NUL byte (the agent's strings are NUL-terminated), a lone surrogate
(not encodable, ``"\\ud800"`` in JSON), a relative WorkingDir (Docker refuses it too) or one with a
``..`` component, a control character in User. Those are refused here, when the image is opened, in
one line that names the field, rather than failing (or crashing) after unpack.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bencher_runner.oci.untrusted import escape, quote
from bencher_runner.spec.errors import ImageError


class ImageConfig(BaseModel):
    """The ``config`` object inside the image config blob."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    entrypoint: list[str] | None = Field(default=None, alias="Entrypoint")
    cmd: list[str] | None = Field(default=None, alias="Cmd")
    env: list[str] = Field(default_factory=list, alias="Env")
    working_dir: str = Field(default="", alias="WorkingDir")
    user: str = Field(default="", alias="User")

    @field_validator("env", mode="before")
    @classmethod
    def _null_env(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("working_dir", "user", mode="before")
    @classmethod
    def _null_str(cls, value: Any) -> Any:
        return "" if value is None else value


class ImageConfigBlob(BaseModel):
    """The whole image config blob (``application/vnd.oci.image.config.v1+json`` or Docker's)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    architecture: str
    os: str
    config: ImageConfig = Field(default_factory=ImageConfig)

    @field_validator("config", mode="before")
    @classmethod
    def _null_config(cls, value: Any) -> Any:
        return {} if value is None else value


_REBUILD = "the image is malformed, rebuild it"


def _bad_text(value: str) -> str | None:
    """Why ``value`` cannot reach the guest, or None."""
    if "\0" in value:
        return "contains a NUL byte"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it holds a lone surrogate)"
    return None


def _refuse(field: str, value: str, why: str, fix: str = _REBUILD) -> ImageError:
    return ImageError(f"image config field config.{field}: {quote(value)} {why}; {fix}")


def _check_values(cfg: ImageConfig) -> None:
    lists = (("Entrypoint", cfg.entrypoint or []), ("Cmd", cfg.cmd or []), ("Env", cfg.env))
    for field, items in lists:
        for i, item in enumerate(items):
            why = _bad_text(item)
            if why is not None:
                raise _refuse(f"{field}[{i}]", item, why)
    for field, value in (("WorkingDir", cfg.working_dir), ("User", cfg.user)):
        why = _bad_text(value)
        if why is not None:
            raise _refuse(field, value, why)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in cfg.user):
        raise _refuse("User", cfg.user, "contains a control character")
    workdir = cfg.working_dir
    if workdir and not workdir.startswith("/"):
        raise _refuse(
            "WorkingDir", workdir, "is not an absolute path", "set WORKDIR to an absolute path and rebuild"
        )
    if ".." in workdir.split("/"):
        raise _refuse(
            "WorkingDir", workdir, "has a '..' component", "set WORKDIR to a path without '..' and rebuild"
        )


def parse_image_config(data: bytes) -> ImageConfigBlob:
    """Parse an image config blob; :class:`ImageError` if it is not JSON or has the wrong shape."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImageError(f"image config is not valid JSON ({e}); {_REBUILD}") from None
    if not isinstance(raw, dict):
        raise ImageError(f"image config is a JSON {type(raw).__name__}, not an object; {_REBUILD}")
    try:
        blob = ImageConfigBlob.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = escape(".".join(str(p) for p in first["loc"]), 100) or "(top level)"  # loc holds keys
        raise ImageError(
            f"image config field {where}: {first['msg']} (got {quote(first.get('input'), 80)}); {_REBUILD}"
        ) from None
    _check_values(blob.config)
    return blob
