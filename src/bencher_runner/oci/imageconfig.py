"""The OCI image config blob, reduced to what the runner needs to start the benchmark.

The blob carries the default command, environment, working directory and user (Docker-cased keys
inside ``config``). Parsing is tolerant of everything the runner does not use (unknown fields are
ignored, JSON ``null`` means "not set") and strict about the shape of what it does use.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


def parse_image_config(data: bytes) -> ImageConfigBlob:
    """Parse an image config blob; :class:`ImageError` if it is not JSON or has the wrong shape."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImageError(
            f"image config is not valid JSON ({e}); the image is malformed, rebuild it"
        ) from None
    if not isinstance(raw, dict):
        raise ImageError(
            f"image config is a JSON {type(raw).__name__}, not an object; the image is malformed, rebuild it"
        )
    try:
        return ImageConfigBlob.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ImageError(
            f"image config field {where}: {first['msg']} (got {first.get('input')!r:.80}); "
            "the image is malformed, rebuild it"
        ) from None
