"""Check every op of every available fast backend against the torch reference on this machine.

Each op runs on the first-use validation probes (fastsr.ops.validate: the code paths real models
take) in every dtype and both memory formats, through the same entry points real calls use, and
is judged by the tolerance rule |ours - ref64| <= 2 |torch - ref64| + atol ("worst" is the largest
error / bound: <= 1 passes; to_uint8 must be exact). Exit status 1 if anything fails.

  fastsr selftest                       # the CPU backends
  fastsr selftest --device cuda --json results/selftest.json
  fastsr selftest --device cuda --jsonl results/cases.jsonl   # one line per check, as it ends
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "check every op of every fast backend against the reference on this machine"
DTYPES = ("float32", "float16", "bfloat16")
# Combinations a backend cannot run by design, reported instead of run.
NOT_RUN = {("triton", "cpu", "bfloat16"): "the Triton interpreter has no bf16 tl.dot"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device to test (default: cpu)")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON to PATH")
    p.add_argument("--jsonl", metavar="PATH",
                   help="append each check to PATH as one JSON line as soon as it ends (a run killed part-way "
                        "keeps the checks it finished)")
    p.add_argument("--backends", metavar="NAMES", help="comma-separated fast backends to check (default: all)")


def _row(op: str, name: str, backend, device, dtype: str, channels_last: bool | None) -> dict:
    """One check; ``channels_last`` None: a probe that holds both memory formats."""
    import torch

    from ..ops.validate import KernelError, run_probe

    layout = "both" if channels_last is None else "channels_last" if channels_last else "NCHW"
    row = {"op": op, "backend": name, "dtype": dtype, "format": layout}
    start = time.perf_counter()
    try:
        verdict = run_probe(op, backend, device, getattr(torch, dtype), bool(channels_last))
        row.update(ok=verdict.ok, worst=round(verdict.ratio, 3), detail="" if verdict.ok else str(verdict))
    except KernelError as failure:
        row.update(ok=False, worst=None, detail=f"{type(failure.__cause__).__name__}: {failure.__cause__}"[:200])
    row["ms"] = round(1e3 * (time.perf_counter() - start), 1)
    return row


def collect(device_type: str, backends: list[str] | None = None, on_row=None) -> tuple[list[dict], list[str]]:
    """(rows of results, lines about backends that are unavailable on ``device_type``), for every
    fast backend or those named in ``backends``; ``on_row(row)`` is called as each row is measured."""
    import torch

    from ..ops import dispatch
    from ..ops.contract import OPS

    rows, skipped = [], []
    for name in dispatch.BACKENDS:
        if name == "torch" or (backends is not None and name not in backends):
            continue  # the reference itself, or not asked for
        ok, why = dispatch.availability(name, device_type)
        if not ok:
            skipped.append(f"{name}: unavailable on {device_type}: {why}")
            continue
        backend = dispatch.backend_module(name)
        skipped += [f"{name} {dtype}: {why}" for (n, d, dtype), why in NOT_RUN.items() if (n, d) == (name, device_type)]
        checks = [(op, dtype, cl) for op in OPS for dtype in DTYPES if (name, device_type, dtype) not in NOT_RUN
                  for cl in (False, True)]
        # Optional training kernels (contract.OPTIONAL_OPS) where they serve; their probe holds both layouts.
        checks += [(op, str(dtype).removeprefix("torch."), None)
                   for op, serves in getattr(backend, "OPTIONAL", {}).items()
                   for device, dtype in sorted(serves, key=str) if device == device_type]
        for op, dtype, channels_last in checks:
            rows.append(_row(op, name, backend, torch.device(device_type), dtype, channels_last))
            if on_row is not None:
                on_row(rows[-1])
    return rows, skipped


def _print_table(rows: list[dict]) -> None:
    print(f"{'op':<20} {'backend':<7} {'dtype':<9} {'format':<13} {'result':<6} {'worst':>6} {'ms':>8}")
    for r in rows:
        worst = "-" if r["worst"] is None else f"{r['worst']:.3f}"
        print(f"{r['op']:<20} {r['backend']:<7} {r['dtype']:<9} {r['format']:<13} {'ok' if r['ok'] else 'FAIL':<6} "
              f"{worst:>6} {r['ms']:>8.1f}" + ("" if r["ok"] else f"  {r['detail']}"))


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import UserError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to this PyTorch")
    path = Path(args.json) if args.json else None
    lines = Path(args.jsonl) if args.jsonl else None
    for option, target in (("--json", path), ("--jsonl", lines)):
        if target is not None and not target.parent.is_dir():  # checked before the work, not after
            raise UserError(f"{option} {target}: folder {target.parent} does not exist")
    backends = args.backends.split(",") if args.backends else None

    def append(row: dict) -> None:
        if lines is not None:
            with open(lines, "a") as f:
                f.write(json.dumps({"step": "selftest", "device": args.device, **row}) + "\n")

    rows, skipped = collect(args.device, backends, append)
    _print_table(rows)
    for line in skipped:
        print(f"skipped {line}")
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed ({args.device}, {len(rows)} checks)")
    if path is not None:
        path.write_text(json.dumps({"device": args.device, "rows": rows, "skipped": skipped}, indent=1))
    return 1 if failed else 0
