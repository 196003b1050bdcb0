"""pytest plugin of the GPU check (benchmarks/gpu_check.py loads it with ``-p gpu_check_plugin``):
one JSON line per test case, appended to $FASTSR_RESULTS_JSONL as soon as the case ends, so a step
killed by its time box keeps every case it finished (pytest-benchmark writes its JSON only at the
end). A benchmark's line carries its group, mean and min seconds, rounds and extra_info."""

from __future__ import annotations

import json
import os

import pytest


def _append(record: dict) -> None:
    path = os.environ.get("FASTSR_RESULTS_JSONL")
    if not path:
        return
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one append per line: whole lines, even from several xdist workers
    finally:
        os.close(fd)


def _benchmark(item) -> dict:
    bench = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    if stats is None or not getattr(stats, "data", None):
        return {}
    return {"group": bench.group, "mean_s": stats.mean, "min_s": stats.min, "rounds": len(stats.data),
            "extra_info": dict(bench.extra_info)}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    # The call phase of every case; setup too when it did not pass (a skip or an error there).
    if report.when != "call" and not (report.when == "setup" and not report.passed):
        return
    record = {"step": os.environ.get("FASTSR_STEP", ""), "case": item.nodeid, "outcome": report.outcome,
              "seconds": round(report.duration, 3)}
    if report.skipped and isinstance(report.longrepr, tuple):
        record["why"] = report.longrepr[-1]
    if report.failed:
        record["error"] = report.longreprtext[-2000:]
    _append({**record, **_benchmark(item)})
