import json
from typing import Any

from bencher_runner.fakeserver import default_config, default_spec
from bencher_runner.protocol import (
    EXIT_UPDATE,
    CancelJob,
    DropTerminal,
    PersistTerminal,
    ProtocolSettings,
    Reconnect,
    RunnerProtocol,
    Send,
    StartJob,
    Stop,
    UpdateAvailable,
    cap_message,
    encode,
    terminal_message,
)
from bencher_runner.spec.results import IterationOutput, RunResult

J = "550e8400-e29b-41d4-a716-446655440000"


def sent(actions: list[Any]) -> list[dict[str, Any]]:
    return [a.message for a in actions if isinstance(a, Send)]


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


def running_proto(now: float = 0.0) -> RunnerProtocol:
    p = RunnerProtocol(ProtocolSettings(poll_timeout=5))
    assert sent(p.connect(now)) == [{"event": "ready", "poll_timeout": 5}]
    acts = p.received(job_frame(), now)
    assert sent(acts) == [{"event": "running"}]
    assert any(isinstance(a, StartJob) and a.job == J for a in acts)
    assert sent(p.received(ack(), now + 0.1)) == []
    return p


def test_happy_path() -> None:
    p = running_proto()
    assert p.state == "running"
    assert p.next_timer() == 1.0
    assert sent(p.tick(1.0)) == [{"event": "heartbeat"}]
    assert sent(p.tick(1.5)) == []  # one in flight
    p.received(ack(), 1.1)
    assert sent(p.tick(2.0)) == [{"event": "heartbeat"}]
    p.received(ack(), 2.1)
    acts = p.job_finished(J, RunResult("completed", [IterationOutput(0, stdout=b"x")], None), 2.5)
    assert isinstance(acts[0], PersistTerminal)
    assert sent(acts) == [{"event": "completed", "job": J, "results": [{"exit_code": 0, "stdout": "x"}]}]
    assert p.state == "reporting"
    acts = p.received(ack(), 2.6)
    assert DropTerminal(J) in acts
    assert sent(acts)[0]["event"] == "ready"


def test_metadata_in_ready() -> None:
    meta = {"os": "linux", "arch": "x86_64", "version": "0.1.0"}
    p = RunnerProtocol(ProtocolSettings(runner_metadata=meta))
    assert sent(p.connect(0)) == [{"event": "ready", "poll_timeout": 55, "runner": meta}]


def test_no_job_sends_ready_again_and_poll_deadline_reconnects() -> None:
    p = RunnerProtocol(ProtocolSettings(poll_timeout=5))
    p.connect(0)
    assert sent(p.received('{"event":"no_job"}', 5)) == [{"event": "ready", "poll_timeout": 5}]
    assert p.next_timer() == 40
    assert any(isinstance(a, Reconnect) for a in p.tick(40))


def test_outbox_resent_before_ready() -> None:
    msg = {"event": "completed", "job": J, "results": []}
    p = RunnerProtocol(ProtocolSettings(), pending=[(J, msg)])
    assert sent(p.connect(0)) == [msg]
    assert sent(p.received(ack("other"), 0.1)) == []  # wrong job: keep waiting
    assert any(isinstance(a, Reconnect) for a in p.tick(5.0))
    p.disconnected(5.0)
    assert sent(p.connect(6)) == [msg]  # resent after reconnect
    acts = p.received(ack(), 6.1)
    assert DropTerminal(J) in acts and sent(acts)[0]["event"] == "ready"


def test_cancel_in_reply_to_heartbeat() -> None:
    p = running_proto()
    p.tick(1.0)
    acts = p.received('{"event":"cancel"}', 1.1)
    assert CancelJob(J) in acts
    assert sent(acts) == [{"event": "canceled", "job": J}]
    acts = p.received(ack(), 1.2)
    assert sent(acts) == []  # no ready until the job thread is done; no heartbeats either
    assert sent(p.tick(3.0)) == []
    acts = p.job_finished(J, RunResult("failed", [], None, error="canceled"), 3.1)
    assert sent(acts) == [{"event": "ready", "poll_timeout": 5}]


def test_invalid_job_sends_running_then_failed() -> None:
    p = RunnerProtocol(ProtocolSettings())
    p.connect(0)
    acts = p.received(job_frame(cpu=0), 0)
    assert sent(acts) == [{"event": "running"}] and not any(isinstance(a, StartJob) for a in acts)
    acts = p.received(ack(), 0.1)
    assert sent(acts) == [
        {"event": "failed", "job": J, "results": [], "error": "spec.cpu=0: a job needs at least 1 CPU"}
    ]
    assert sent(p.received(ack(), 0.2))[0]["event"] == "ready"


def test_job_without_uuid_reconnects() -> None:
    p = RunnerProtocol(ProtocolSettings())
    p.connect(0)
    assert any(isinstance(a, Reconnect) for a in p.received('{"event":"job"}', 0))


def test_out_of_order_messages() -> None:
    p = RunnerProtocol(ProtocolSettings())
    p.connect(0)
    for frame in ("{bad", "[1]", '{"event": 3}', '{"event":"surprise"}', ack(), '{"event":"cancel"}'):
        assert sent(p.received(frame, 0)) == []
    assert p.state == "awaiting_job"
    q = running_proto()
    assert any(isinstance(a, Reconnect) for a in q.received(job_frame("other"), 0.2))
    q = running_proto()
    assert sent(q.received('{"event":"no_job"}', 0.2)) == [] and q.state == "running"
    q.tick(1.0)
    assert any(isinstance(a, Reconnect) for a in q.received(ack("other-job"), 1.1))
    q = running_proto()
    assert any(isinstance(a, Reconnect) for a in q.tick(1.0) + q.tick(6.5))  # no reply to heartbeat


def test_update() -> None:
    p = RunnerProtocol(ProtocolSettings())
    p.connect(0)
    acts = p.received('{"event":"update","version":"9","url":"u","checksum":"c"}', 0)
    assert UpdateAvailable("9", "u", "c") in acts and Stop(EXIT_UPDATE, "runner update 9 available") in acts
    p = RunnerProtocol(ProtocolSettings(auto_update=False))
    p.connect(0)
    assert any(isinstance(a, Reconnect) for a in p.received('{"event":"update"}', 0))


def test_disconnect_before_running_acked_fails_the_job() -> None:
    p = RunnerProtocol(ProtocolSettings())
    p.connect(0)
    p.received(job_frame(), 0)
    acts = p.disconnected(0.1)
    assert CancelJob(J) in acts and any(isinstance(a, PersistTerminal) for a in acts)
    assert sent(p.connect(1)) == [
        {"event": "failed", "job": J, "results": [], "error": p.pending[0].message["error"]}
    ]
    p.received(ack(), 1.1)
    assert p.job_finished(J, RunResult("completed", [], None), 1.2) and not p.pending


def test_disconnect_mid_job_keeps_running_and_reports_later() -> None:
    p = running_proto()
    assert p.disconnected(1.0) == []
    assert sent(p.connect(2.0)) == []  # detached: nothing until the job ends
    assert sent(p.tick(3.0)) == []
    acts = p.job_finished(J, RunResult("completed", [], None), 4.0)
    assert sent(acts) == [{"event": "completed", "job": J, "results": []}]


def test_shutdown_cancel_and_finish() -> None:
    p = running_proto()
    acts = p.shutdown(0.5)
    assert CancelJob(J) in acts
    p.job_finished(J, RunResult("failed", [], None, error="canceled"), 0.6)
    assert p.in_flight is not None and p.in_flight.kind == "terminal"
    assert Stop(0) in p.received(ack(), 0.7)
    p = RunnerProtocol(ProtocolSettings(shutdown_cancels=False))
    p.connect(0)
    p.received(job_frame(), 0)
    p.received(ack(), 0)
    assert not any(isinstance(a, CancelJob) for a in p.shutdown(0.1))
    idle = RunnerProtocol(ProtocolSettings())
    idle.connect(0)
    assert Stop(0) in idle.shutdown(0.1)


def test_terminal_message_capped() -> None:
    big = IterationOutput(0, stdout=b"x" * 100_000, stderr=b"y" * 10, output={"/f": b"\x00" * 50_000})
    msg = terminal_message(J, RunResult("failed", [big, big], None, error="boom"), max_bytes=20_000)
    assert len(encode(msg).encode()) <= 20_000
    assert "truncated" in msg["error"]
    bigger = terminal_message(J, RunResult("completed", [big, big], None), max_bytes=250_000)
    assert len(encode(bigger).encode()) <= 250_000
    assert "truncated by bencher-runner" in encode(bigger)
    small = {"event": "completed", "job": J, "results": []}
    assert cap_message(small, 1000) == small
