"""`python -m bencher_runner.fakeserver`: serve a fake Bencher API on loopback for manual trials."""

import argparse
import asyncio
import json

from bencher_runner.fakeserver.server import FakeBencher, default_config


async def _main(args: argparse.Namespace) -> None:
    server = FakeBencher(
        runner=args.runner,
        key=args.key,
        heartbeat_timeout=args.heartbeat_timeout,
        grace_period=args.grace_period,
        reject_with_401=args.reject_401,
    )
    await server.start(args.port)
    jobs = [server.add_job(config=default_config(registry=args.registry)) for _ in range(args.jobs)]
    print(f"fake Bencher API at {server.url} runner={args.runner} key={args.key} jobs={jobs}", flush=True)
    try:
        while True:
            await asyncio.sleep(5)
            states = {j: (server.job_state(j), server.results(j)) for j in jobs}
            print(json.dumps(states), flush=True)
    finally:
        await server.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bencher_runner.fakeserver")
    parser.add_argument("--port", type=int, default=6610)
    parser.add_argument("--runner", default="fake-runner")
    parser.add_argument("--key", default="bencher_runner_" + "a1" * 15)
    parser.add_argument("--jobs", type=int, default=1, help="jobs queued at start")
    parser.add_argument("--registry", default="http://127.0.0.1:5000/")
    parser.add_argument("--heartbeat-timeout", type=float, default=90.0)
    parser.add_argument("--grace-period", type=float, default=60.0)
    parser.add_argument("--reject-401", action="store_true", help="answer bad keys with HTTP 401")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
