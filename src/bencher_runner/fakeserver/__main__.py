"""`python -m bencher_runner.fakeserver`: a fake Bencher API on loopback to try a runner host against.

It behaves like a v0.6.12 server on the runner channel; the options shorten its timeouts and inject
faults (a server that never acks `completed`, one that drops the connection at `running`, ...).
"""

import argparse
import asyncio
import contextlib
import json
import signal

from bencher_runner.fakeserver.server import (
    DEFAULT_KEY,
    DEFAULT_MAX_MESSAGE,
    FAULT_POINTS,
    FakeBencher,
    Fault,
    default_config,
)


def _fault(text: str) -> tuple[str, Fault]:
    point, _, action = text.partition("=")
    if point not in FAULT_POINTS or action not in {f.value for f in Fault}:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected POINT=ACTION with POINT one of {', '.join(FAULT_POINTS)} and ACTION one of "
            f"{', '.join(f.value for f in Fault)}"
        )
    return point, Fault(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bencher_runner.fakeserver",
        description="Serve a fake Bencher API (runner channel, v0.6.12 behaviour) on 127.0.0.1.",
    )
    p.add_argument(
        "--port", type=int, default=6610, help="port on 127.0.0.1 (default 6610; 0: any free port)"
    )
    p.add_argument("--runner", default="fake-runner", help="the runner's slug (default fake-runner)")
    p.add_argument(
        "--key", default=DEFAULT_KEY, help="the runner key: bencher_runner_ + 30 letters or digits"
    )
    job = p.add_argument_group("jobs queued at start")
    job.add_argument("--jobs", type=int, default=1, help="how many (default 1)")
    job.add_argument("--registry", default="http://127.0.0.1:5000/", help="config.registry")
    job.add_argument("--project", default=default_config()["project"], help="config.project (a UUID)")
    job.add_argument("--digest", default=default_config()["digest"], help="config.digest (sha256:<64 hex>)")
    job.add_argument("--timeout", type=int, default=60, help="config.timeout in seconds (default 60)")
    job.add_argument("--config", type=json.loads, default={}, help="more config fields as a JSON object")
    srv = p.add_argument_group("server behaviour")
    srv.add_argument("--heartbeat-timeout", type=float, default=90.0, help="read timeout, s (default 90)")
    srv.add_argument(
        "--grace-period", type=float, default=60.0, help="hard limit = timeout + this (default 60)"
    )
    srv.add_argument(
        "--default-poll-timeout", type=int, default=30, help="for `ready` without one (default 30)"
    )
    srv.add_argument(
        "--poll-interval", type=float, default=1.0, help="claim attempts while polling (default 1 s)"
    )
    srv.add_argument(
        "--max-message-size", type=int, default=DEFAULT_MAX_MESSAGE, help="bytes; bigger drops the connection"
    )
    srv.add_argument(
        "--reject-401", action="store_true", help="answer bad keys with HTTP 401 before the upgrade"
    )
    srv.add_argument("--server-version", help="offer `update` to stable runners reporting another version")
    srv.add_argument(
        "--fault",
        type=_fault,
        action="append",
        default=[],
        metavar="POINT=ACTION",
        help="apply ACTION to every message at POINT, e.g. completed=withhold (never ack completed), "
        "running=drop; actions: drop (not applied, connection dropped), drop-after (applied, then "
        "dropped), withhold (applied, no reply), lose (ignored, no reply)",
    )
    srv.add_argument("--status-every", type=float, default=5.0, help="print job states every N s (default 5)")
    return p


async def _main(args: argparse.Namespace) -> None:
    server = FakeBencher(
        runner=args.runner,
        key=args.key,
        heartbeat_timeout=args.heartbeat_timeout,
        grace_period=args.grace_period,
        default_poll_timeout=args.default_poll_timeout,
        poll_interval=args.poll_interval,
        max_message_size=args.max_message_size,
        reject_with_401=args.reject_401,
        server_version=args.server_version,
    )
    for point, fault in args.fault:
        server.inject(point, fault, times=None)
    await server.start(args.port)
    config = default_config(
        registry=args.registry, project=args.project, digest=args.digest, timeout=args.timeout
    )
    jobs = [server.add_job(config={**config, **args.config}) for _ in range(args.jobs)]
    print(f"fake Bencher API at {server.url} runner={args.runner} jobs={jobs}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.status_every)
            states = {j: {"state": server.job_state(j), "output": server.results(j)} for j in jobs}
            print(json.dumps(states), flush=True)
    finally:
        await server.close()  # Close 1001 `server shutting down` to connected runners


def main() -> None:
    asyncio.run(_main(parser().parse_args()))


if __name__ == "__main__":
    main()
