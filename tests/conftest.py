"""Give JAX 8 CPU devices, a collective timeout and quick compiles before its backend starts."""

import gc
import os

_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    # A stuck collective fails the test run within a minute instead of hanging.
    "--xla_cpu_collective_timeout_seconds=60",
    # The tests' programs are tiny: compiling them fast matters, optimising them
    # does not (a third of the suite's CPU time).
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)


def _with_flags(existing: str) -> str:
    flags = existing.split()
    names = {flag.split("=")[0] for flag in flags}
    flags += [flag for flag in _XLA_FLAGS if flag.split("=")[0] not in names]
    return " ".join(flags)


os.environ["XLA_FLAGS"] = _with_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import pytest  # noqa: E402

try:
    jax.config.update("jax_num_cpu_devices", 8)
except RuntimeError:
    # The backend is already up (a plugin started it); XLA_FLAGS may still have
    # applied, and tests/test_devices.py reports the device count either way.
    pass


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Collect garbage in an xdist worker before it reports that its session is over.

    After that report the worker has 5 s to exit before execnet interrupts it
    (a ``KeyboardInterrupt`` traceback per worker after the summary), and
    pytest's cleanup runs ``gc.collect()`` five times over a heap full of JAX
    programs, over a second each on a loaded 2-core machine. Collecting here,
    before the report, and freezing what survives makes those collections quick.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        gc.collect()
        gc.freeze()
