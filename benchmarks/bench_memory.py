"""Memory over long runs: 10,000 warm statemap.vmap calls and 1,000 statemap.pmap calls.

Run from the repository root:

    python benchmarks/bench_memory.py

Workload: the RNN cell of the other benchmarks (two parameter states, a hidden
state split per lane, one random draw per lane). The script gives JAX 8 CPU
devices itself. For each mapping it prints, before and after the run and at
checkpoints in between: the process's resident memory (``VmRSS`` from
``/proc/self/status``; its peak ``VmHWM``, and ``ru_maxrss`` from
``resource.getrusage``), the number of live JAX arrays (``jax.live_arrays()``
after a garbage collection), and the number of Python runs of the mapped
function (one per traced signature, so it stays at 1 once warm). Every pmap
call blocks on its results (JAX-NOTES fact 10). A last run builds a new
mapping for each of 100 calls (each call is cold) and shows what the dropped
mappings leave behind.

Memory is flat when the live array count is unchanged and RSS stops growing
after the first checkpoint (allocator and compilation caches settle in the
first few hundred calls).
"""

from __future__ import annotations

import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_cpu_collective_timeout_seconds=60")
_existing = os.environ.get("XLA_FLAGS", "").split()
_names = {flag.split("=")[0] for flag in _existing}
os.environ["XLA_FLAGS"] = " ".join(_existing + [f for f in _FLAGS if f.split("=")[0] not in _names])

import gc  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402  (XLA_FLAGS must be set first)
from workload import RNNCell, load  # noqa: E402

import statemap  # noqa: E402

VMAP_CALLS = 10_000
PMAP_CALLS = 1_000
NEW_MAPPINGS = 100
VMAP_LANES = 32
PMAP_LANES = 8
CHECKPOINTS = 5


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def snapshot(label: str, cell: RNNCell) -> dict[str, float]:
    gc.collect()
    return {
        "label": label,
        "rss_mib": proc_status("VmRSS") / 1024,
        "hwm_mib": proc_status("VmHWM") / 1024,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "live_arrays": len(jax.live_arrays()),
        "python_runs": cell.python_runs,
    }


def print_row(row: dict[str, float]) -> None:
    print(
        f"  {row['label']:>14}  RSS {row['rss_mib']:8.1f} MiB  peak {row['hwm_mib']:8.1f} MiB  "
        f"ru_maxrss {row['maxrss_mib']:8.1f} MiB  live arrays {row['live_arrays']:5d}  "
        f"python runs {row['python_runs']}"
    )


def run(name: str, cell: RNNCell, call: Callable[[], None], calls: int) -> None:
    print(f"{name}: {calls:,} calls")
    for _ in range(3):  # cold call, and the recompile for committed state values
        call()
    rows = [snapshot("before", cell)]
    print_row(rows[0])
    start = time.perf_counter()
    step = calls // CHECKPOINTS
    for done in range(step, calls + 1, step):
        for _ in range(step):
            call()
        rows.append(snapshot(f"after {done:,}", cell))
        print_row(rows[-1])
    elapsed = time.perf_counter() - start
    first, last = rows[0], rows[-1]
    print(
        f"  change: RSS {last['rss_mib'] - first['rss_mib']:+.1f} MiB "
        f"(from the first checkpoint: {last['rss_mib'] - rows[1]['rss_mib']:+.1f} MiB), "
        f"live arrays {last['live_arrays'] - first['live_arrays']:+d}, "
        f"python runs {last['python_runs'] - first['python_runs']:+d}; "
        f"{elapsed / calls * 1e6:.0f} µs per call"
    )


def main() -> None:
    print(f"jax {jax.__version__}, {jax.device_count()} devices, load at start {load()}")

    cell = RNNCell(VMAP_LANES)
    step = statemap.vmap(cell, state_in_axes={0: statemap.HiddenState})

    def vmap_call() -> None:
        step(cell.x)  # results are dropped; the states hold the new values

    run("statemap.vmap", cell, vmap_call, VMAP_CALLS)
    jax.block_until_ready(cell.h.value)

    pcell = RNNCell(PMAP_LANES)
    pstep = statemap.pmap(pcell, "devices", state_in_axes={0: statemap.HiddenState})

    def pmap_call() -> None:
        jax.block_until_ready((pstep(pcell.x), pcell.h.value, pcell.rng.value))

    run("statemap.pmap", pcell, pmap_call, PMAP_CALLS)

    # A mapping built anew every step (``statemap.vmap(f)(x)`` in a loop): each
    # call is cold; what must not grow is what the dropped mappings leave behind.
    ncell = RNNCell(VMAP_LANES)

    def new_mapping_call() -> None:
        statemap.vmap(ncell, state_in_axes={0: statemap.HiddenState})(ncell.x)

    run("new statemap.vmap per call", ncell, new_mapping_call, NEW_MAPPINGS)
    print(f"load at end {load()}")


if __name__ == "__main__":
    main()
