"""The daemon's per-job interference line and metrics; nothing of it reaches the wire."""

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from bencher_runner import metrics
from bencher_runner.fakeserver import FakeBencher
from bencher_runner.host.interference import attribute, interference, read_snapshot
from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.results import IterationOutput, RunResult

from .conftest import Runner
from .test_daemon import Start, _done

DATA = Path(__file__).parent.parent / "data" / "interference"


def _report(case: str) -> dict[str, Any]:
    before = read_snapshot(DATA / case / "before", 0.0, (1,), 500)
    after = read_snapshot(DATA / case / "after", 2.0, (1,), 500)
    return interference(before, after, (1,), attribute(before.tasks, after.tasks, (1,), [500]))


def _executor(config: RunConfig, cancel: threading.Event) -> RunResult:
    return RunResult(
        "completed",
        [IterationOutput(0, stdout=b"bench 42\n"), IterationOutput(0, stdout=b"bench 43\n")],
        None,
        interference=[_report("idle"), _report("busy_neighbour")],
        fingerprint={"accel": "tcg"},
    )


async def test_daemon_logs_one_interference_line_and_sends_nothing_new(
    server: FakeBencher, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    job = server.add_job()
    runner: Runner = start(_executor)
    await server.wait_for(_done(server, job))
    assert server.results(job) == {
        "results": [{"exit_code": 0, "stdout": "bench 42\n"}, {"exit_code": 0, "stdout": "bench 43\n"}]
    }
    assert await runner.stop() == 0
    lines = [r.getMessage() for r in caplog.records if "interference:" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(
        "job interference: disturbed in 1/2 iteration(s): iteration 2: other tasks took"
    )
    assert "busyneighbour" in lines[0]


def test_interference_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import REGISTRY

    class Holder:
        interference = metrics._InterferenceMetrics()

    monkeypatch.setattr(metrics, "_metrics", Holder())
    metrics.interference([_report("idle"), _report("busy_neighbour"), _report("irq_storm"), None])

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    assert value("bencher_runner_interference_iterations_total", verdict="clean") == 1
    assert value("bencher_runner_interference_iterations_total", verdict="disturbed") == 2
    assert value("bencher_runner_interference_disturbed_checks_total", check="other_tasks") == 1
    assert value("bencher_runner_interference_disturbed_checks_total", check="irqs") == 1
    assert value("bencher_runner_interference_disturbed_checks_total", check="softirqs") == 1
    assert value("bencher_runner_interference_share", source="other_tasks") == pytest.approx(0.0, abs=0.01)
    assert value("bencher_runner_interference_share", source="steal") == 0
