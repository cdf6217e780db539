"""bencher-runner: run benchmark jobs (OCI images) inside microVMs for Bencher."""

__version__ = "0.1.0"
