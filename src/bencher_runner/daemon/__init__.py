"""`runner daemon`: serve a Bencher API over one WebSocket (asyncio driver around protocol.py)."""

from bencher_runner.daemon.driver import (
    AuthError,
    Daemon,
    DaemonSettings,
    Executor,
    channel_url,
    default_executor,
    run_daemon,
    validate_key,
)

__all__ = [
    "AuthError",
    "Daemon",
    "DaemonSettings",
    "Executor",
    "channel_url",
    "default_executor",
    "run_daemon",
    "validate_key",
]
