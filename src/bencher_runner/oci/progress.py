"""What a pull reports as it goes; its own module so that reporters need not import the HTTP stack."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PullProgress:
    """One progress report. ``kind`` says which blob; ``done``/``total`` are bytes of that blob.

    ``cached``: the blob was already in the cache (reported once, with done == total). ``complete``:
    the blob is verified and in the cache. Callbacks may arrive from several threads at once.
    """

    image: str
    kind: Literal["manifest", "config", "layer"]
    digest: str
    done: int
    total: int
    cached: bool = False
    complete: bool = False


ProgressCallback = Callable[[PullProgress], None]
