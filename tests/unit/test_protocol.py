"""Example tests of the sans-IO runner protocol (tests/unit/test_protocol_stateful.py drives it at random)."""

import json
from typing import Any

import pytest

from bencher_runner.fakeserver import default_config, default_spec
from bencher_runner.protocol import (
    EXIT_UPDATE,
    MAX_CANCELED_ATTEMPTS,
    TRUNCATION_NOTE,
    CancelJob,
    CheckHost,
    DropTerminal,
    HostChecked,
    ParkTerminal,
    PersistTerminal,
    ProtocolSettings,
    Reconnect,
    RunnerProtocol,
    Send,
    StartJob,
    State,
    Stop,
    Terminal,
    UpdateAvailable,
    encode,
    terminal_message,
)
from bencher_runner.spec.results import IterationOutput, RunResult

J = "550e8400-e29b-41d4-a716-446655440000"
K = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


def sent(actions: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(a.message.wire()) for a in actions if isinstance(a, Send)]


def job_frame(uuid: str = J, **spec: Any) -> str:
    return json.dumps(
        {
            "event": "job",
            "uuid": uuid,
            "spec": default_spec(**spec),
            "config": default_config(),
            "timeout": 60,
        }
    )


def ack(job: str | None = J) -> str:
    return json.dumps({"event": "ack", "job": job} if job else {"event": "ack"})


def proto(**settings: Any) -> RunnerProtocol:
    fields: dict[str, Any] = {"poll_timeout": 5, "check_host": False}
    fields.update(settings)
    return RunnerProtocol(ProtocolSettings(**fields))


def running_proto(now: float = 0.0, **settings: Any) -> RunnerProtocol:
    p = proto(**settings)
    assert sent(p.connect(now)) == [{"event": "ready", "poll_timeout": 5}]
    acts = p.received(job_frame(), now)
    assert sent(acts) == [{"event": "running"}]
    assert any(isinstance(a, StartJob) and a.job == J for a in acts)
    assert sent(p.received(ack(), now + 0.1)) == []
    return p


def done(stdout: bytes = b"42") -> RunResult:
    return RunResult("completed", [IterationOutput(0, stdout=stdout)], None)


def test_happy_path() -> None:
    p = running_proto()
    assert p.state is State.IDLE
    assert p.next_timer() == 1.0
    assert sent(p.tick(1.0)) == [{"event": "heartbeat"}]
    assert p.state is State.AWAITING_ACK  # type: ignore[comparison-overlap]  # mypy narrowed it above
    assert sent(p.received(ack(), 1.05)) == []
    acts = p.job_finished(J, done(), 1.5)
    persisted = [a for a in acts if isinstance(a, PersistTerminal)]
    assert len(persisted) == 1 and persisted[0].message.event == "completed"
    assert sent(acts) == [{"event": "completed", "job": J, "results": [{"exit_code": 0, "stdout": "42"}]}]
    acts = p.received(ack(), 1.6)
    assert DropTerminal(J) in acts
    assert sent(acts) == [{"event": "ready", "poll_timeout": 5}]


def test_metadata_in_ready() -> None:
    p = proto(runner_metadata={"os": "linux", "arch": "x86_64", "version": "0.1.0"})
    ready = sent(p.connect(0))[0]
    assert ready == {
        "event": "ready",
        "poll_timeout": 5,
        "runner": {"os": "linux", "arch": "x86_64", "version": "0.1.0"},
    }


def test_no_job_sends_ready_again_and_poll_deadline_reconnects_once() -> None:
    p = proto()
    p.connect(0)
    assert sent(p.received('{"event":"no_job"}', 5)) == [{"event": "ready", "poll_timeout": 5}]
    assert p.next_timer() == 5 + 5 + 30
    acts = p.tick(40)
    assert any(isinstance(a, Reconnect) for a in acts)
    assert p.state is State.DISCONNECTED
    assert p.next_timer() is None  # the timer that fired is gone: a driver cannot spin on it
    assert p.tick(40) == [] and p.tick(41) == []


def test_heartbeat_ack_timeout_reconnects_once_and_the_job_runs_on() -> None:
    """Regression (issue #12 finding 3): the timer that fired stayed due, and the driver spun on it."""
    p = running_proto()
    p.tick(1.0)  # heartbeat in flight
    acts = p.tick(6.0)
    assert [a for a in acts if isinstance(a, Reconnect)] and not [a for a in acts if isinstance(a, CancelJob)]
    assert p.state is State.DISCONNECTED and p.next_timer() is None
    assert p.tick(6.0) == []
    assert p.disconnected(6.1) == []  # the driver's close report: already handled
    assert sent(p.connect(7)) == []  # the job runs on, detached: nothing until its result
    assert p.next_timer() is None
    assert sent(p.job_finished(J, done(), 8))[0]["event"] == "completed"


def test_outbox_resent_before_ready() -> None:
    old = Terminal.of({"event": "failed", "job": K, "results": [], "error": "x"})
    p = RunnerProtocol(ProtocolSettings(poll_timeout=5, check_host=False), pending=[old])
    assert sent(p.connect(0)) == [{"event": "failed", "job": K, "results": [], "error": "x"}]
    acts = p.received(ack(K), 0.1)
    assert DropTerminal(K) in acts
    assert sent(acts) == [{"event": "ready", "poll_timeout": 5}]


def test_cancel_in_reply_to_heartbeat() -> None:
    p = running_proto()
    p.tick(1.0)
    acts = p.received('{"event":"cancel"}', 1.1)
    assert CancelJob(J) in acts
    assert sent(acts) == [{"event": "canceled", "job": J}]
    acts = p.received(ack(), 1.2)
    assert DropTerminal(J) in acts and sent(acts) == []  # no `ready` while the job still stops
    assert p.next_timer() is None  # and no heartbeats either
    acts = p.job_finished(J, RunResult("failed", [], None, error="canceled"), 1.5)
    assert not [a for a in acts if isinstance(a, PersistTerminal)]  # the server has its answer
    assert sent(acts) == [{"event": "ready", "poll_timeout": 5}]


def test_canceled_is_resent_only_a_few_times() -> None:
    p = running_proto()
    p.tick(1.0)
    p.received('{"event":"cancel"}', 1.1)  # `canceled` in flight
    t, everything = 2.0, []
    for _ in range(MAX_CANCELED_ATTEMPTS + 2):  # the server drops the connection on each `canceled`
        p.disconnected(t)
        everything += p.connect(t + 1)
        t += 2
    assert sum(m.get("event") == "canceled" for m in sent(everything)) == MAX_CANCELED_ATTEMPTS - 1
    assert ParkTerminal(J) in everything


def test_invalid_job_sends_running_then_failed() -> None:
    p = proto()
    p.connect(0)
    acts = p.received(job_frame(cpu=0), 0)
    assert sent(acts) == [{"event": "running"}]
    assert not any(isinstance(a, StartJob) for a in acts)
    acts = p.received(ack(), 0.1)
    assert sent(acts) == [
        {"event": "failed", "job": J, "results": [], "error": "spec.cpu=0: a job needs at least 1 CPU"}
    ]
    assert sent(p.received(ack(), 0.2)) == [{"event": "ready", "poll_timeout": 5}]


@pytest.mark.parametrize("uuid", ["not a valid id", "../../etc/passwd", "\udcff", "x" * 300])
def test_job_with_a_bad_uuid_is_answered_and_encodable(uuid: str) -> None:
    """Regression (issue #12 finding 6): such a job killed the daemon; now it is failed like any bad job."""
    p = proto()
    p.connect(0)
    frame = json.dumps({"event": "job", "uuid": uuid, "spec": default_spec(), "config": default_config(),
                        "timeout": 60})  # fmt: skip
    acts = p.received(frame, 0)
    assert not any(isinstance(a, StartJob) for a in acts)
    acts = p.received(ack(uuid), 0.1)
    msgs = [a.message for a in acts if isinstance(a, Send)]
    assert msgs and isinstance(msgs[0], Terminal) and msgs[0].event == "failed"
    msgs[0].wire().encode()  # never a lone surrogate on the wire


def test_job_without_uuid_reconnects() -> None:
    p = proto()
    p.connect(0)
    acts = p.received('{"event":"job","spec":{}}', 0)
    assert any(isinstance(a, Reconnect) for a in acts)
    assert p.state is State.DISCONNECTED


def test_out_of_order_messages() -> None:
    p = proto()
    p.connect(0)
    assert sent(p.received("{not json", 0)) == []
    assert sent(p.received('{"event":"surprise"}', 0)) == []
    assert sent(p.received(b"\x00binary", 0)) == []
    assert sent(p.received(ack(K), 0)) == []  # stale
    assert any(isinstance(a, Reconnect) for a in p.received('{"event":"cancel"}', 0))  # as Bencher's runner
    p = running_proto()
    assert any(isinstance(a, Reconnect) for a in p.received(job_frame(K), 0.5))  # a job while one runs


def test_ack_for_another_job_while_running_reconnects() -> None:
    p = running_proto()
    p.tick(1.0)
    assert any(isinstance(a, Reconnect) for a in p.received(ack(K), 1.1))


def test_update() -> None:
    p = proto()
    p.connect(0)
    acts = p.received('{"event":"update","version":"9.9.9","url":"u","checksum":"c"}', 0)
    assert UpdateAvailable("9.9.9", "u", "c") in acts
    assert next(a for a in acts if isinstance(a, Stop)).exit_code == EXIT_UPDATE
    p = proto(auto_update=False)
    p.connect(0)
    acts = p.received('{"event":"update","version":"9.9.9","url":"u","checksum":"c"}', 0)
    assert any(isinstance(a, Reconnect) for a in acts) and not any(isinstance(a, Stop) for a in acts)


def test_disconnect_before_running_acked_fails_the_job() -> None:
    p = proto()
    p.connect(0)
    p.received(job_frame(), 0)  # `running` in flight
    acts = p.disconnected(0.5)
    assert CancelJob(J) in acts
    persisted = [a.message for a in acts if isinstance(a, PersistTerminal)]
    assert (
        persisted and persisted[0].event == "failed" and "lost before the job started" in persisted[0].wire()
    )
    assert sent(p.job_finished(J, done(), 1)) == []  # its result is discarded
    assert sent(p.connect(2))[0]["event"] == "failed"


def test_disconnect_mid_job_keeps_running_and_reports_later() -> None:
    p = running_proto()
    assert not any(isinstance(a, CancelJob) for a in p.disconnected(0.5))
    assert sent(p.job_finished(J, done(), 1)) == []  # persisted only
    assert sent(p.connect(2)) == [
        {"event": "completed", "job": J, "results": [{"exit_code": 0, "stdout": "42"}]}
    ]


def test_shutdown_cancels_reports_and_stops_after_the_ack() -> None:
    p = running_proto()
    acts = p.shutdown(0.5)
    assert CancelJob(J) in acts
    acts = p.job_finished(J, RunResult("failed", [], None, error="canceled"), 1.0)
    assert sent(acts)[0]["event"] == "failed"
    acts = p.received(ack(), 1.1)
    assert DropTerminal(J) in acts and any(isinstance(a, Stop) for a in acts)


def test_shutdown_finish_waits_for_the_job() -> None:
    p = running_proto(shutdown_cancels=False)
    assert not any(isinstance(a, CancelJob) for a in p.shutdown(0.5))
    assert sent(p.tick(1.0)) == [{"event": "heartbeat"}]  # heartbeats go on
    p.received(ack(), 1.1)
    acts = p.job_finished(J, done(), 3)
    assert sent(acts)[0]["event"] == "completed"
    assert any(isinstance(a, Stop) for a in p.received(ack(), 3.1))


def test_shutdown_without_an_ack_stops_within_one_ack_timeout() -> None:
    """Regression (issue #13, shutdown spin): no ack for the terminal message at shutdown -> exit, kept."""
    p = running_proto()
    p.shutdown(0.5)
    p.job_finished(J, RunResult("failed", [], None, error="canceled"), 1.0)
    assert p.next_timer() == pytest.approx(6.0)
    acts = p.tick(6.0)
    assert any(isinstance(a, Stop) for a in acts)
    assert not any(isinstance(a, (Reconnect, DropTerminal)) for a in acts)  # stays in the outbox
    assert p.tick(6.0) == [] and p.stopped


def test_shutdown_with_the_connection_lost_stops_once_the_result_is_saved() -> None:
    p = running_proto()
    p.shutdown(0.5)
    assert not any(isinstance(a, Stop) for a in p.disconnected(0.6))
    acts = p.job_finished(J, RunResult("failed", [], None, error="canceled"), 1.0)
    assert [a for a in acts if isinstance(a, PersistTerminal)] and any(isinstance(a, Stop) for a in acts)


def test_second_shutdown_request_stops_as_soon_as_the_job_is_saved() -> None:
    p = running_proto(shutdown_cancels=False)
    p.shutdown(0.5)
    assert CancelJob(J) in p.shutdown(0.6)
    acts = p.job_finished(J, RunResult("failed", [], None, error="killed"), 0.8)
    assert [a for a in acts if isinstance(a, PersistTerminal)] and any(isinstance(a, Stop) for a in acts)


def test_shutdown_while_idle_or_polling_stops_at_once() -> None:
    p = proto()
    p.connect(0)  # polling
    assert any(isinstance(a, Stop) for a in p.shutdown(1))
    p = proto()
    assert any(isinstance(a, Stop) for a in p.shutdown(1))  # not even connected


def test_a_job_that_does_not_stop_does_not_hold_the_shutdown() -> None:
    p = running_proto()
    p.shutdown(0.5)
    now = 0.5
    while not p.stopped:
        timer = p.next_timer()
        assert timer is not None and timer <= 0.5 + 5.0 + 1e-9
        now = timer
        p.tick(now)
        if p.state is State.AWAITING_ACK:
            p.received(ack(), now + 0.01)  # heartbeats are acked; the job never finishes
    assert now == pytest.approx(5.5)


def test_host_check_before_every_ready() -> None:
    p = proto(check_host=True)
    assert p.connect(0) == [CheckHost()]
    assert p.state is State.CHECKING
    acts = p.host_checked("no guest kernel bundle in /x; run `runner kernel fetch`", 0.1)
    assert sent(acts) == [] and "no guest kernel" in acts[0].text  # type: ignore[union-attr]
    assert p.next_timer() == pytest.approx(5.1)
    assert p.tick(3) == []
    assert p.tick(5.1) == [CheckHost()]
    assert p.host_checked("no guest kernel bundle in /x; run `runner kernel fetch`", 5.2) == []  # logged once
    assert p.next_timer() == pytest.approx(15.2)  # backoff doubles
    assert p.tick(15.2) == [CheckHost()]
    acts = p.host_checked(None, 15.3)
    assert sent(acts) == [{"event": "ready", "poll_timeout": 5}]
    acts = p.received('{"event":"no_job"}', 20)
    assert acts == [CheckHost()]  # checked again before the next `ready`


def test_terminal_message_capped_with_bounded_work() -> None:
    big = IterationOutput(
        0,
        stdout=b"x" * 3_000_000,
        stderr=b"\x00\x01" * 200_000,  # JSON escapes each of these as 6 bytes
        output={f"/out/{i}": bytes(range(256)) * 4000 for i in range(20)},
    )
    result = RunResult("failed", [big, big], None, error="exit 1")
    for limit in (64 * 1024, 300_000, 1_000_000):
        msg = terminal_message(J, result, limit)
        wire = msg.wire().encode()
        assert len(wire) <= limit
        doc = json.loads(wire)
        assert "outputs truncated" in doc["error"]
        assert TRUNCATION_NOTE in doc["results"][0]["stdout"]
        assert len(doc["results"]) == 2 and len(doc["results"][0]["output"]) == 20


def test_terminal_message_small_results_untouched() -> None:
    msg = terminal_message(J, done(b"hello \xff"), 4 * 1024 * 1024)
    assert json.loads(msg.wire()) == {
        "event": "completed",
        "job": J,
        "results": [{"exit_code": 0, "stdout": "hello \ufffd"}],
    }


def test_terminal_message_drops_iterations_only_when_empty_outputs_do_not_fit() -> None:
    result = RunResult("completed", [IterationOutput(0)] * 20_000, None)
    msg = terminal_message(J, result, 65_536)
    assert len(msg.wire().encode()) <= 65_536
    assert 0 < len(json.loads(msg.wire())["results"]) < 20_000


@pytest.mark.parametrize("text", ["tar entry \udcff\udcfe", "\ud800 alone", "ok \u00e9"])
def test_everything_on_the_wire_is_utf8(text: str) -> None:
    """Regression (issue #12 finding 7): a lone surrogate in an error or output name crashed the send."""
    out = IterationOutput(1, stdout=b"a", output={f"/out/{text}": b"z"})
    msg = terminal_message(J, RunResult("failed", [out], None, error=text), 1 << 20)
    msg.wire().encode("utf-8")
    encode({"error": text}).encode("utf-8")
    json.loads(msg.wire())


def test_terminal_message_keeps_a_bmf_entry_whole() -> None:
    bmf = '{"bench":{"file-size":{"value":3000000.0,"lower_value":null,"upper_value":null}}}'
    out = IterationOutput(0, stdout=b"s" * 200_000, output={"/out/big": b"b" * 3_000_000}, bmf=bmf)
    msg = terminal_message(J, RunResult("completed", [out], None), 100_000)
    doc = json.loads(msg.wire())
    assert len(msg.wire().encode()) <= 100_000
    assert doc["results"][0]["output"] == {"\u0000bencher": bmf}
    assert TRUNCATION_NOTE in doc["results"][0]["stdout"]


def test_a_paused_host_sends_no_ready_and_rechecks_every_second() -> None:
    p = proto(check_host=True)
    assert p.connect(0) == [CheckHost()]
    acts = p.host_checked_verdict(HostChecked(None, ("drained by maintenance",), ()), 0.1)
    assert sent(acts) == [] and any("paused, asking for no job" in getattr(a, "text", "") for a in acts)
    assert p.next_timer() == pytest.approx(1.1)
    assert p.tick(1.1) == [CheckHost()]
    assert p.host_checked_verdict(HostChecked(None, ("drained by maintenance",), ()), 1.2) == []  # said once
    acts = p.host_checked_verdict(HostChecked(None), 2.2)
    assert sent(acts) == [{"event": "ready", "poll_timeout": 5}]


def test_announce_pause_sends_paused_and_a_job_handed_anyway_fails_without_running() -> None:
    p = proto(check_host=True, announce_pause=True)
    p.wall_clock = lambda: "2026-12-02T07:30:00Z"
    p.connect(0)
    reasons = ({"kind": "maintenance", "marker": True, "lock": False},)
    health = {"state": "ok"}
    acts = p.host_checked_verdict(HostChecked(None, ("drained",), reasons, health), 0.1)
    assert sent(acts) == [{"event": "paused", "poll_timeout": 5, "health": {"state": "ok"},
                           "reasons": list(reasons), "since": "2026-12-02T07:30:00Z"}]  # fmt: skip
    acts = p.received(job_frame(), 1)
    assert not any(isinstance(a, StartJob) for a in acts)
    msgs = sent(acts)
    assert msgs[0]["event"] == "failed" and msgs[0]["results"] == [] and "paused" in msgs[0]["error"]
    p = proto(check_host=True)  # without the flag nothing new goes on the wire
    p.connect(0)
    acts = p.host_checked_verdict(HostChecked(None, (), (), health), 0.1)
    assert sent(acts) == [{"event": "ready", "poll_timeout": 5}]
