"""One worker of ``python -m statemap.launch``: join the job, then run the user's script.

The launcher runs ``python -m statemap._distributed SCRIPT ARGS...`` once per
worker, with the job in the environment (see ``worker_environment``). The
worker calls ``jax.distributed.initialize`` before any JAX computation, then
runs the script as ``__main__``, as ``python SCRIPT ARGS...`` would.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import traceback
from collections.abc import Mapping

__all__ = ["worker_environment"]

_XLA_FLAGS_SET_HERE = ("--xla_force_host_platform_device_count", "--xla_cpu_collective_timeout_seconds")


def worker_environment(
    base: Mapping[str, str], *, coordinator: str, num_processes: int, process_id: int, devices: int, timeout: float
) -> dict[str, str]:
    """The environment of worker ``process_id``: ``base`` plus the job, its devices and timeouts.

    Device-count and collective-timeout flags in ``base``'s ``XLA_FLAGS`` give
    way to the launcher's; other flags are kept.
    """
    kept = [f for f in base.get("XLA_FLAGS", "").split() if f.split("=")[0] not in _XLA_FLAGS_SET_HERE]
    flags = [
        *kept,
        f"--xla_force_host_platform_device_count={devices}",
        # A collective whose peers never arrive aborts the worker instead of hanging.
        f"--xla_cpu_collective_timeout_seconds={max(1, round(timeout))}",
    ]
    return {
        **base,
        "XLA_FLAGS": " ".join(flags),
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(devices),
        # Output must reach the launcher even when the worker aborts.
        "PYTHONUNBUFFERED": "1",
        "STATEMAP_COORDINATOR": coordinator,
        "STATEMAP_NUM_PROCESSES": str(num_processes),
        "STATEMAP_PROCESS_ID": str(process_id),
        "STATEMAP_TIMEOUT": str(timeout),
        "STATEMAP_LAUNCHER_PID": str(os.getpid()),
    }


def _die_with_launcher() -> None:
    """On Linux, have the kernel kill this worker when the launcher dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(os.environ["STATEMAP_LAUNCHER_PID"]):
        os._exit(1)  # it died before the line above


def _join() -> None:
    import jax

    # One bound for joining, heartbeats and shutdown: a worker starved of CPU
    # (a loaded machine) must not be declared dead sooner than a slow one.
    timeout = max(1, round(float(os.environ["STATEMAP_TIMEOUT"])))
    jax.distributed.initialize(
        coordinator_address=os.environ["STATEMAP_COORDINATOR"],
        num_processes=int(os.environ["STATEMAP_NUM_PROCESSES"]),
        process_id=int(os.environ["STATEMAP_PROCESS_ID"]),
        initialization_timeout=timeout,
        heartbeat_timeout_seconds=timeout,
        shutdown_timeout_seconds=timeout,
    )


def _run(script: str, args: list[str]) -> None:
    """Run ``script`` as ``__main__``; a failure ends the worker at once with its exit code.

    ``os._exit`` skips JAX's shutdown barrier, which would otherwise wait for
    the other workers (up to the timeout) before this one could report.
    """
    sys.argv = [script, *args]
    # As ``python SCRIPT`` does; the working directory stays importable after it.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code in (None, 0):
            return
        if not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
        _exit(stop.code if isinstance(stop.code, int) else 1)
    except BaseException:
        traceback.print_exc()
        _exit(1)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _die_with_launcher()
    _join()
    _run(sys.argv[1], sys.argv[2:])
