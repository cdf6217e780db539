"""A faithful fake Bencher API (runner channel only) for tests and local trials."""

from bencher_runner.fakeserver.server import FakeBencher, FakeJob, default_config, default_spec

__all__ = ["FakeBencher", "FakeJob", "default_config", "default_spec"]
