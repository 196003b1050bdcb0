"""Show fastsr's environment: versions, devices, and which backends are available (and why not).

--build also builds the C++ extension now if it has not been built (otherwise it builds on first use),
and retries a build that failed before (failures are remembered so that not every process retries);
its exit status is 1 when that build failed, so scripts (the GPU check) see it.
"""

from __future__ import annotations

import argparse
import platform

HELP = "versions, devices and available backends"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build", action="store_true",
                   help="build the C++ extension now if needed (retrying a remembered failed build), and report")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__
    from ..ops.dispatch import BACKENDS, availability, get_backend

    print(f"fastsr {__version__}   python {platform.python_version()}   torch {torch.__version__}")
    try:
        import importlib.metadata as md

        print(f"triton {md.version('triton')}")
    except Exception:
        print("triton not installed")
    cuda = torch.cuda.is_available()
    devices = [f"cpu ({torch.get_num_threads()} threads)"]
    if cuda:
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    print("devices: " + ", ".join(devices))
    print(f"backend in effect: {get_backend()}")
    device_types = ["cpu", "cuda"] if cuda else ["cpu"]
    from ..csrc import backend as ext

    state = ext.build_info(build=args.build)
    if state["built"] is None:
        print(f"C++ extension: {'built, cached in' if state['cached'] else 'not built yet, will build into'} "
              f"{state['build_dir']} ('fastsr info --build' builds and checks it now)")
    else:
        print(f"C++ extension: {'built' if state['built'] else 'build failed'} in {state['build_dir']}"
              f" (ISA: {state['isa']}, CUDA part: {'yes' if state['with_cuda'] else 'no'})")
    for name in BACKENDS:
        for device_type in device_types:
            if name == "cpp" and state["built"] is None and not state["cached"]:
                # Checking would compile it (minutes); a cached library is only loaded.
                print(f"  {name:<7} {device_type:<5} not built yet: builds on first use, or now with --build")
                continue
            ok, why = availability(name, device_type)
            print(f"  {name:<7} {device_type:<5} {'available' if ok else 'unavailable'}: {why}")
    if args.build and not state["built"]:
        print(f"C++ extension build failed: {state['reason']}")
        return 1
    return 0
