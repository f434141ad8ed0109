"""``python -m benchmarks``: statemap against hand-threaded JAX and its peers, one table.

Run from the repository root::

    python -m benchmarks                  # full run, about 15 min on 2 loaded cores
    python -m benchmarks --quick          # a smoke run (CI): small sizes, peers on one workload
    python -m benchmarks --plot out.png   # also draw the ratios (needs matplotlib)

For every workload and contender it prints the median warm-call time, its
ratio to hand-threaded raw JAX, the Python runs of the user's function on the
cold call and per warm call, and the cold-call time. The contenders of one
workload run interleaved in this one process. brainstate, Flax NNX and
Equinox are measured when installed (``pip install -e '.[bench]'``), skipped
with a note otherwise. See benchmarks/README.md.
"""

from __future__ import annotations

import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_cpu_collective_timeout_seconds=60")
_existing = os.environ.get("XLA_FLAGS", "").split()
_names = {flag.split("=")[0] for flag in _existing}
os.environ["XLA_FLAGS"] = " ".join(_existing + [f for f in _FLAGS if f.split("=")[0] not in _names])

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import jax.numpy as jnp  # noqa: E402

from .workload import load  # noqa: E402
from .workloads_common import RAW, Row, Workload, measure  # noqa: E402
from .workloads_lif import lif_ensemble  # noqa: E402
from .workloads_loop import loop, shard  # noqa: E402
from .workloads_rnn import rnn, states  # noqa: E402
from .workloads_sgd import sgd  # noqa: E402


def workloads(quick: bool) -> list[Callable[[bool], Workload]]:
    """Every workload, in the order of the table."""
    counts = () if quick else (10, 100, 1000)  # --quick: the RNN workload runs the same code
    return [rnn, lif_ensemble, sgd, *(partial(states, n=n) for n in counts), loop, shard]


def versions() -> str:
    """The versions of JAX, statemap's peers and the machine the figures come from."""
    names = ["jax", "jaxlib", "brainstate", "flax", "equinox"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} CPU devices"
    return f"{', '.join(found)}; Python {platform.python_version()}; {machine}"


def warm_jax() -> None:
    """Start JAX's backend and first-use machinery, so no contender's cold call pays for it."""
    jax.block_until_ready(jax.jit(jax.vmap(lambda a: a + 1))(jnp.ones((2, 2))))
    jax.block_until_ready(jax.pmap(lambda a: jax.lax.psum(a, "i"), "i")(jnp.ones((8, 2))))


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table (readable in a terminal, pasted as is into the README)."""
    lines = [
        "| workload | contender | API | warm µs | × raw JAX | caller CPU µs | Python runs: cold | per warm call | cold s |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.workload} | {r.name} | `{r.api}` | {r.warm_s * 1e6:,.0f} | {r.ratio:.2f} | {r.cpu_s * 1e6:,.0f} "
            f"| {r.cold_runs} | {r.warm_runs:g} | {r.cold_s:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse the options, measure every workload, print the table, draw the plot."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions: a smoke run (CI)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the ratios to raw JAX as a bar chart")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {versions()}")
    print(f"load {load()} at the start")
    warm_jax()
    rows, notes = [], []
    for i, build in enumerate(workloads(args.quick)):
        workload = build(args.quick)
        if args.quick and i > 0:  # the peers' code runs once, on the first workload
            workload.contenders = [c for c in workload.contenders if c.name in ("statemap", RAW)]
        print(f"... {workload.title}", flush=True)
        rows += measure(workload)
        notes += [note for note in workload.notes if note not in notes]
    print()
    print(table(rows))
    for note in notes:
        print(note)
    print(f"\nload {load()} at the end; {time.perf_counter() - start:.0f} s in all")
    if args.plot:
        from .workloads_plot import plot

        plot(rows, args.plot)
        print(f"ratios drawn in {args.plot}")


if __name__ == "__main__":
    main()
