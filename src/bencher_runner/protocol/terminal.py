"""The `completed`/`failed` message of a job's result, capped under the server's frame size limit.

A result may hold hundreds of MiB of outputs (255 files of 25 MiB per iteration); the message may not
exceed ``max_bytes``. Byte budgets are shared out before anything is decoded, so memory stays bounded
by what is kept, and this runs in the job's worker thread, never on the event loop.
"""

from collections.abc import Callable, Sequence
from dataclasses import replace

from bencher_runner.protocol.messages import Terminal, encode, one_line_error, wire_size
from bencher_runner.spec.results import IterationOutput, RunResult

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024 - 64 * 1024  # the server's 4 MiB frame cap, minus margin
TRUNCATION_NOTE = "\n[truncated by bencher-runner: the result exceeded the message size limit]"


def _cut(data: bytes, keep: int) -> bytes:
    """At most ``keep`` bytes of ``data``, not ending inside a UTF-8 sequence."""
    if keep >= len(data):
        return data
    end = max(keep, 0)
    for _ in range(3):  # a UTF-8 sequence has at most 3 continuation bytes
        if end > 0 and (data[end] & 0xC0) == 0x80:
            end -= 1
    return data[:end]


def _share(sizes: list[int], budget: int) -> list[int]:
    """Water-filling: the largest equal cap under which the sizes (each capped) sum to ``budget``."""
    caps = [0] * len(sizes)
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    left, remaining = max(budget, 0), len(sizes)
    for i in order:
        fair = left // remaining
        caps[i] = min(sizes[i], fair)
        left -= caps[i]
        remaining -= 1
    return caps


def _sources(outputs: Sequence[IterationOutput]) -> list[int]:
    """Sizes of what goes on the wire: stdout, stderr and (unless a BMF entry replaces them) the files."""
    sizes: list[int] = []
    for out in outputs:
        sizes += [len(out.stdout), len(out.stderr)]
        if out.bmf is None:
            sizes += [len(data) for data in out.output.values()]
    return sizes


def _trimmed(outputs: Sequence[IterationOutput], caps: list[int]) -> tuple[list[IterationOutput], bool]:
    """Copies of ``outputs`` whose stdout, stderr and files are cut to ``caps`` (in that order)."""
    note = TRUNCATION_NOTE.encode()
    it = iter(caps)  # in the order of `_sources`
    cut_any = False

    def cap(data: bytes) -> bytes:
        nonlocal cut_any
        limit = next(it)
        if len(data) <= limit:
            return data
        cut_any = True
        kept = _cut(data, limit - len(note))
        return kept + note if kept else b""

    trimmed = []
    for out in outputs:
        stdout, stderr = cap(out.stdout), cap(out.stderr)
        files = out.output if out.bmf is not None else {path: cap(data) for path, data in out.output.items()}
        trimmed.append(replace(out, stdout=stdout, stderr=stderr, output=files))
    return trimmed, cut_any


def _most_that_fit(
    build: Callable[[Sequence[IterationOutput], str | None], str],
    empty: Sequence[IterationOutput],
    note: str,
    max_bytes: int,
) -> int:
    """How many of the (emptied) iterations fit in ``max_bytes``, with the note of those dropped.

    A binary search: each probe encodes at most ``max_bytes`` of JSON."""
    fits, too_many = 0, len(empty)
    while too_many - fits > 1:
        mid = (fits + too_many) // 2
        size = wire_size(build(empty[:mid], f"{note}; {len(empty) - mid} iteration result(s) dropped"))
        fits, too_many = (mid, too_many) if size <= max_bytes else (fits, mid)
    return fits


def terminal_message(job: str, result: RunResult, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Terminal:
    """`completed` or `failed` for a RunResult, its wire form under ``max_bytes``.

    Memory stays bounded by what is kept: byte budgets are shared out over every stdout, stderr and
    file (water-filling) before anything is decoded, and lowered a few times if decoding and JSON
    escaping made the message larger than planned. Iterations are dropped from the end only when even
    empty outputs do not fit. Runs in the job's worker thread, never on the event loop.
    """
    outputs = list(result.results)
    error = one_line_error(result.error or "job failed")

    def build(items: Sequence[IterationOutput], note: str | None) -> str:
        results = [r.to_protocol() for r in items]
        if result.status == "completed":
            return encode({"event": "completed", "job": job, "results": results})
        return encode(
            {
                "event": "failed",
                "job": job,
                "results": results,
                "error": f"{error} ({note})" if note else error,
            }
        )

    sizes = _sources(outputs)
    empty = [
        replace(
            o, stdout=b"", stderr=b"", output=o.output if o.bmf is not None else dict.fromkeys(o.output, b"")
        )
        for o in outputs
    ]
    note = "outputs truncated to fit the message size limit"
    overhead = wire_size(build(empty, note))
    dropped = 0
    if overhead > max_bytes:  # even empty outputs are too many: keep the most iterations that fit
        fits = _most_that_fit(build, empty, note, max_bytes)
        dropped = len(empty) - fits
        empty = empty[:fits]
        overhead = wire_size(build(empty, f"{note}; {dropped} iteration result(s) dropped"))
    if dropped:
        outputs = outputs[: len(empty)]
        sizes = _sources(outputs)
        note = f"{note}; {dropped} iteration result(s) dropped"
    if not dropped and sum(sizes) * 6 + overhead <= max_bytes:  # fits whatever the escaping does
        return Terminal(result.status, job, build(outputs, None))
    budget = max_bytes - overhead
    text = build(empty, note)
    for _ in range(8):
        caps = _share(sizes, budget)
        items, cut = _trimmed(outputs, caps)
        candidate = build(items, note if cut or dropped else None)
        size = wire_size(candidate)
        if size <= max_bytes:
            text = candidate
            break
        budget = int(budget * max_bytes / size * 0.97) - 64  # escaping grew it: plan for that ratio
    return Terminal(result.status, job, text)
