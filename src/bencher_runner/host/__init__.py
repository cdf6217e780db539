"""Host-side isolation: CPU layout and pinning, per-job cgroups, host tuning, and `runner doctor`."""
