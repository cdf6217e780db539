"""The runner protocol driven by hypothesis with arbitrary inputs and times, as a driver would feed it.

Properties (issue #13): every input yields a bounded number of actions; a `tick` at the same `now`
twice does nothing the second time; a shutdown reaches `Stop` within one ack timeout once nothing runs
(or within the cancel wait while a canceled job still runs); a terminal message leaves the outbox only
with its ack; `canceled` is only sent in answer to `cancel`; one message is in flight at a time.
"""

import json
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bencher_runner.fakeserver import default_config, default_spec
from bencher_runner.protocol import (
    ACK_TIMEOUT_S,
    Ack,
    CheckHost,
    DropTerminal,
    Heartbeat,
    ParkTerminal,
    PersistTerminal,
    ProtocolSettings,
    Ready,
    Received,
    RunnerProtocol,
    Send,
    StartJob,
    State,
    Stop,
    Terminal,
    parse_server_message,
)
from bencher_runner.protocol.machine import SHUTDOWN_CANCEL_WAIT_S
from bencher_runner.spec.results import IterationOutput, RunResult

JOBS = ["550e8400-e29b-41d4-a716-446655440000", "6ba7b810-9dad-11d1-80b4-00c04fd430c8"]
MAX_ACTIONS = 12


def _job_frame(uuid: str, valid: bool) -> str:
    spec = default_spec() if valid else default_spec(cpu=0)
    return json.dumps({"event": "job", "uuid": uuid, "spec": spec, "config": default_config(), "timeout": 60})


FRAMES = st.one_of(
    st.sampled_from([*JOBS, None]).map(
        lambda j: json.dumps({"event": "ack", "job": j} if j else {"event": "ack"})
    ),
    st.builds(_job_frame, st.sampled_from(JOBS), st.booleans()),
    st.just('{"event":"no_job"}'),
    st.just('{"event":"cancel"}'),
    st.just('{"event":"update","version":"9","url":"u","checksum":"c"}'),
    st.sampled_from(["{bad json", '{"event":"surprise"}', "[]", '{"job":1}']),
)


class ProtocolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.p = RunnerProtocol(ProtocolSettings(poll_timeout=5, check_host=True))
        self.now = 0.0
        self.running: set[str] = set()  # StartJob'd, not yet finished
        self.checks = 0  # CheckHost outstanding
        self.persisted: set[str] = set()
        self.cancel_answerable: set[str] = set()  # jobs the server has sent `cancel` for
        self.shutdown_at: float | None = None
        self.job_end_at: float | None = None
        self.cancels = True
        self.stopped_at: float | None = None

    @initialize(cancels=st.booleans())
    def settings(self, cancels: bool) -> None:
        self.cancels = cancels
        self.p = RunnerProtocol(
            ProtocolSettings(
                poll_timeout=5, ack_timeout=ACK_TIMEOUT_S, shutdown_cancels=cancels, check_host=True
            )
        )

    # -- feeding ---------------------------------------------------------------------------------------
    def feed(self, fn: Any, *args: Any) -> list[Any]:
        before_state = self.p.state
        before_inflight = self.p.in_flight
        actions: list[Any] = fn(*args)
        assert len(actions) <= MAX_ACTIONS, actions
        sends = [a for a in actions if isinstance(a, Send)]
        assert len(sends) <= 1, actions  # one message in flight at a time
        for a in actions:
            if isinstance(a, StartJob):
                assert a.job not in self.running
                self.running.add(a.job)
            elif isinstance(a, CheckHost):
                self.checks += 1
            elif isinstance(a, PersistTerminal):
                self.persisted.add(a.message.job)
            elif isinstance(a, DropTerminal):
                # Only with its ack: the input was an ack while that job's terminal was in flight.
                is_ack = bool(args) and isinstance(args[0], Received) and isinstance(args[0].message, Ack)
                assert is_ack and before_state is State.AWAITING_ACK, actions
                assert before_inflight is not None and before_inflight.kind == "terminal"
                assert before_inflight.job == a.job
                self.persisted.discard(a.job)
            elif isinstance(a, ParkTerminal):
                self.persisted.discard(a.job)
            elif isinstance(a, Stop):
                self.stopped_at = self.now
            elif isinstance(a, Send):
                msg = a.message
                if isinstance(msg, Terminal):
                    assert msg.job in self.persisted  # persisted before it is sent
                    if msg.event == "canceled":
                        assert msg.job in self.cancel_answerable
                    msg.wire().encode()
                if isinstance(msg, Ready):
                    assert self.p.job is None and not self.p.pending
                if isinstance(msg, Heartbeat):
                    assert self.p.job is not None
        return actions

    # -- rules -----------------------------------------------------------------------------------------
    @precondition(lambda self: self.p.state is State.DISCONNECTED)
    @rule()
    def connect(self) -> None:
        self.feed(self.p.connect, self.now)

    @rule()
    def disconnect(self) -> None:
        self.feed(self.p.disconnected, self.now)

    @precondition(lambda self: self.p.connected)
    @rule(frame=FRAMES)
    def frame(self, frame: str) -> None:
        message = parse_server_message(frame)
        inflight = self.p.in_flight
        if (
            message.__class__.__name__ == "Cancel"
            and self.p.state is State.AWAITING_ACK
            and inflight is not None
            and inflight.kind != "terminal"
        ):
            self.cancel_answerable.add(inflight.job)
        self.feed(self.p.handle, Received(message), self.now)

    @precondition(lambda self: bool(self.running))
    @rule(ok=st.booleans(), size=st.integers(0, 3000))
    def job_finishes(self, ok: bool, size: int) -> None:
        job = sorted(self.running)[0]
        self.running.discard(job)
        if self.shutdown_at is not None:
            self.job_end_at = self.now
        result = RunResult(
            "completed" if ok else "failed",
            [IterationOutput(0 if ok else 1, stdout=b"x" * size)],
            None,
            error=None if ok else "boom",
        )
        self.feed(self.p.job_finished, job, result, self.now)

    @precondition(lambda self: self.checks > 0)
    @rule(problem=st.sampled_from([None, None, "no guest kernel bundle"]))
    def host_checked(self, problem: str | None) -> None:
        self.checks -= 1
        self.feed(self.p.host_checked, problem, self.now)

    @rule()
    def shutdown(self) -> None:
        if self.shutdown_at is None:
            self.shutdown_at = self.now
        self.feed(self.p.shutdown, self.now)

    @rule(dt=st.floats(0, 3))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.tick_twice()

    @precondition(lambda self: self.p.next_timer() is not None)
    @rule()
    def to_next_timer(self) -> None:
        timer = self.p.next_timer()
        assert timer is not None
        self.now = max(self.now, timer)
        self.tick_twice()

    def tick_twice(self) -> None:
        self.feed(self.p.tick, self.now)
        assert self.feed(self.p.tick, self.now) == []  # nothing new at the same `now`

    # -- invariants ------------------------------------------------------------------------------------
    @invariant()
    def timers_are_in_the_future_or_due_once(self) -> None:
        timer = self.p.next_timer()
        if timer is not None and timer <= self.now and not self.p.stopped:
            # A due timer must do something when ticked, then be gone or moved.
            before = (self.p.state, self.p.in_flight, self.p.poll_deadline, self.p.stop_deadline)
            acts = self.feed(self.p.tick, self.now)
            after = (self.p.state, self.p.in_flight, self.p.poll_deadline, self.p.stop_deadline)
            assert acts or before != after

    @invariant()
    def shutdown_is_bounded(self) -> None:
        """Stop within one ack timeout of the later of the request and the job's end; a canceled job
        that does not end is waited for at most the cancel wait."""
        if self.shutdown_at is None or self.p.stopped:
            return
        if self.p.job is not None:
            if self.cancels:
                assert self.now <= self.shutdown_at + SHUTDOWN_CANCEL_WAIT_S + 1e-6
            return
        since = max(self.shutdown_at, self.job_end_at or 0.0)
        assert self.now <= since + ACK_TIMEOUT_S + 1e-6, (self.now, since, self.p.state)


TestProtocolMachine = ProtocolMachine.TestCase
TestProtocolMachine.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
