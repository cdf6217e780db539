"""The tuning flags shared by `runner run` and `runner daemon`, declared once.

`@tuning_options` adds the click options to a command; `tuning_options_from(kwargs)` pops them from the
command's keyword arguments and returns a `TuningOptions`, so commands stay free of per-knob code.
"""

from collections.abc import Callable
from typing import Any, TypeVar, cast

import click

from bencher_runner.host.tuning import (
    PERF_EVENT_PARANOID_RANGE,
    SWAPPINESS_RANGE,
    THP_MODES,
    ThpMode,
    TuningOptions,
)

F = TypeVar("F", bound=Callable[..., Any])

# (flag, parameter name, help) for the keep-as-is switches.
_KEEP_SWITCHES = (
    ("--aslr", "keep_aslr", "Leave ASLR on (default: randomize_va_space=0 during a job)."),
    ("--nmi-watchdog", "keep_nmi_watchdog", "Leave the NMI watchdog on."),
    ("--smt", "keep_smt", "Leave SMT (hyper-threading) on."),
    ("--turbo", "keep_turbo", "Leave turbo/boost on."),
    ("--numa-balancing", "keep_numa_balancing", "Leave automatic NUMA balancing on."),
    ("--timer-migration", "keep_timer_migration", "Leave timer migration on."),
    ("--soft-watchdog", "keep_soft_watchdog", "Leave the soft-lockup watchdog on."),
    ("--ksm", "keep_ksm", "Leave kernel samepage merging on."),
    ("--cstates", "keep_cstates", "Allow deep C-states (default: held off via /dev/cpu_dma_latency)."),
)
TUNING_PARAMS = (
    "no_tuning",
    *(name for _, name, _ in _KEEP_SWITCHES),
    "no_irq_steering",
    "swappiness",
    "governor",
    "perf_event_paranoid",
    "thp",
)


def tuning_options(func: F) -> F:
    """Add the host tuning flags to a click command."""
    lo, hi = PERF_EVENT_PARANOID_RANGE
    decorators: list[Callable[[F], F]] = [
        click.option("--no-tuning", is_flag=True, help="Do not tune the host at all."),
        *(click.option(flag, name, is_flag=True, help=text) for flag, name, text in _KEEP_SWITCHES),
        click.option(
            "--no-irq-steering", is_flag=True, help="Do not steer IRQs and workqueues to housekeeping CPUs."
        ),
        click.option(
            "--swappiness",
            type=click.IntRange(*SWAPPINESS_RANGE),
            default=10,
            show_default=True,
            help="vm.swappiness during a job.",
        ),
        click.option(
            "--governor",
            default="performance",
            show_default=True,
            callback=_check_governor,
            help="CPU frequency governor during a job.",
        ),
        click.option(
            "--perf-event-paranoid",
            type=click.IntRange(lo, hi),
            default=-1,
            show_default=True,
            help="kernel.perf_event_paranoid during a job.",
        ),
        click.option(
            "--thp",
            type=click.Choice(THP_MODES),
            default="never",
            show_default=True,
            help="Transparent huge pages mode during a job (leave = do not touch).",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def _check_governor(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A governor name as TuningOptions takes it (it is written to sysfs), else a usage error."""
    try:
        TuningOptions(governor=value)
    except ValueError as err:
        raise click.BadParameter(f"{err} (e.g. performance, powersave, schedutil)") from None
    return value


def tuning_options_from(kwargs: dict[str, Any]) -> TuningOptions:
    """Pop the tuning flags from a command's kwargs and build the TuningOptions; a value TuningOptions
    refuses is a click usage error (one line, exit 2), never a traceback."""
    values = {name: kwargs.pop(name) for name in TUNING_PARAMS if name in kwargs}
    keeps = {name: bool(values.get(name, False)) for _, name, _ in _KEEP_SWITCHES}
    try:
        return TuningOptions(
            enabled=not values.get("no_tuning", False),
            irq_steering=not values.get("no_irq_steering", False),
            swappiness=int(values.get("swappiness", 10)),
            governor=str(values.get("governor", "performance")),
            perf_event_paranoid=int(values.get("perf_event_paranoid", -1)),
            thp=cast(ThpMode, values.get("thp", "never")),
            **keeps,
        )
    except ValueError as err:
        raise click.UsageError(f"invalid host tuning setting: {err}") from None
