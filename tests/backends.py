"""Which backends the tests must find on this machine."""

import pytest


def require_backend(name: str, device_type: str = "cpu") -> None:
    """Fail (never skip) when a backend this machine must have is unavailable: on CPU the cpp
    extension must build and Triton runs through its interpreter, so a missing one is a bug."""
    import fastsr

    ok, why = fastsr.ops.dispatch.availability(name, device_type)
    if not ok:
        pytest.fail(f"backend {name!r} is unavailable on {device_type}: {why}")
