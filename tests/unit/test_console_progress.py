"""`runner run`'s progress: bars and spinners on a terminal, plain phase lines otherwise."""

import io

from rich.console import Console

from bencher_runner.oci.progress import PullProgress
from bencher_runner.run import ConsoleReporter

LAYER = "sha256:" + "ab" * 32


def events() -> list[PullProgress]:
    total = 8 << 20
    steps = [PullProgress("reg/img@x", "layer", LAYER, done, total) for done in range(0, total + 1, 1 << 20)]
    return [*steps, PullProgress("reg/img@x", "layer", LAYER, total, total, complete=True)]


def drive(reporter: ConsoleReporter) -> None:
    reporter.phase("pulling reg/img@x")
    for event in events():
        reporter.pull(event)
    reporter.phase(f"layer {LAYER[:19]}… pulled (8.0 MiB)")
    reporter.phase("image sha256:1234… verified (1 layers)")
    reporter.phase("unpacking layers")
    reporter.phase("iteration 1/1: booting VM (1 vCPU, 512 MiB, tcg)")
    reporter.close()


def test_a_terminal_gets_a_bar_per_layer_and_spinners() -> None:
    out = io.StringIO()
    reporter = ConsoleReporter(
        echo_output=False, quiet=False, console=Console(file=out, force_terminal=True, width=120)
    )
    assert reporter.live
    drive(reporter)
    text = out.getvalue()
    assert "layer abababababab" in text
    assert "8.0/8.0 MiB" in text  # the bar's byte counter reached the total
    assert "━" in text  # rich's bar
    assert "runner: layer" not in text  # the bar replaces the per-layer line
    assert "unpacking layers" in text and "booting VM" in text


def test_off_a_terminal_only_plain_lines() -> None:
    out = io.StringIO()
    reporter = ConsoleReporter(echo_output=False, quiet=False, console=Console(file=out, width=120))
    assert not reporter.live
    drive(reporter)
    lines = out.getvalue().splitlines()
    assert lines == [
        "runner: pulling reg/img@x",
        f"runner: layer {LAYER[:19]}… pulled (8.0 MiB)",
        "runner: image sha256:1234… verified (1 layers)",
        "runner: unpacking layers",
        "runner: iteration 1/1: booting VM (1 vCPU, 512 MiB, tcg)",
    ]
    assert "\x1b" not in out.getvalue()


def test_quiet_prints_nothing_even_on_a_terminal() -> None:
    out = io.StringIO()
    reporter = ConsoleReporter(
        echo_output=False, quiet=True, console=Console(file=out, force_terminal=True, width=120)
    )
    drive(reporter)
    assert out.getvalue() == ""
