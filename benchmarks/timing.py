"""What the benchmark files read off pytest-benchmark's fixture."""

from __future__ import annotations


def mean_seconds(benchmark) -> float:
    """The mean of a case's timed rounds, or NaN when it ran untimed: under xdist or with
    --benchmark-disable (the GPU check's warm-up step) pytest-benchmark calls each case once and
    keeps no statistics, and the rates derived from the mean are then NaN rather than an error."""
    stats = benchmark.stats
    return stats.stats.mean if stats is not None else float("nan")
