"""One run of a plan: its program on the arguments and the states' values, then the write-back."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import jax

from ._diagnose import tracer_error
from ._donation import shield, spent
from ._jax_internals import refused_devices
from ._plan import Plan, StalePlan
from ._state import State, Watcher, describe
from ._writeback import commit, set_value

__all__ = ["RUN_LOCK", "dispatch"]

# Held while a call reads its states, dispatches its program (asynchronous: microseconds) and
# writes back, so calls touching the same state never interleave; tracing and compiling run
# outside it, under the plan cache's build lock.
RUN_LOCK = threading.RLock()


def dispatch(
    api: str,
    plan: Plan,
    leaves: Sequence[Any],
    values: Sequence[Any],
    made: list[State] | None = None,
    watcher: Watcher | None = None,
    outside: bool = True,
    trusted: bool = False,
) -> Any:
    """Run ``plan``'s program on the argument ``leaves`` and the states' ``values``; write back.

    All or nothing: a call that fails writes nothing, unless the program has
    already consumed the states' old buffers, and then the write-back finishes.

    Args:
      api: the transform's name, for messages.
      plan: the plan to run.
      leaves: the argument leaves, in the plan's order.
      values: the input states' values, in the plan's order.
      made: the states the function created, on the call that traced it.
      watcher: the state watcher the call runs under, if any.
      outside: no JAX transform is running, so every value is concrete.
      trusted: nothing but the program checked the arguments (see ``Shortcut``).

    Returns:
      The function's output.

    Raises:
      StalePlan: the plan cannot run these inputs; the caller finds or builds another.
    """
    inputs = [*leaves, *values] if plan.flat_ins else plan.inputs(leaves, values)
    if plan.donated_states:
        shield(inputs, plan.donated_states, copy_all=watcher is not None or not outside)
    outs = None
    try:
        # One line: no interrupt lands between the program and ``outs``. A host
        # callback may fail after dispatch: wait for it, so a failed call writes nothing.
        outs = jax.block_until_ready(plan.program(*inputs)) if plan.effects else plan.program(*inputs)
        n = plan.num_user_leaves
        if not outside and watcher is None and plan.writes and _any_tracer(outs[n:]):
            raise tracer_error(api, [s for s in (o.ref() for o in plan.outs + plan.advanced) if s is not None])
        if plan.simple_writes is None or watcher is not None or plan.returns_states:
            return commit(plan, outs, made, watcher)
        # The common case, inline on this warm path: one array per written state, in output
        # order after the user's, written in one C loop (an interrupt lands before or after it).
        any(map(set_value, [ref() for ref in plan.simple_writes], outs[n:]))  # type: ignore[arg-type]
        return plan.out_tree.unflatten(outs[:n])
    except BaseException as err:
        if outs is None and isinstance(err, Exception):
            _refine(api, plan, leaves, values, inputs, err, trusted)
        elif outs is not None and plan.donated_states and spent(values):
            commit(plan, outs, made, watcher)  # interrupted after the program took the old buffers: finish
        raise


def _refine(
    api: str,
    plan: Plan,
    leaves: Sequence[Any],
    values: Sequence[Any],
    inputs: Sequence[Any],
    err: Exception,
    trusted: bool,
) -> None:
    """Raise what the program's failure ``err`` means when statemap knows better than JAX.

    A ``trusted`` call's arguments were never checked: the long way checks
    them, and explains the failure if it happens again.
    """
    if (trusted and not spent(values)) or not plan.fits(values):
        raise StalePlan() from None
    if _committed_apart(inputs):
        states = plan.states() or []
        raise ValueError(f"{api}: incompatible devices: {_placement(leaves, states, values)}") from err
    if refused_devices(err):
        where = _where(plan.states() or [], values)
        raise ValueError(
            f"{api}: the program runs on other devices than the values it was given ({where}; JAX's "
            f"message below names the program's devices). A mapping called on its own moves the states "
            f"it reads onto its devices, but not inside {api}: call the mapping once outside it, or move "
            f"the state first (`state.value = jax.device_put(state.value, sharding)`)."
        ) from err


def _any_tracer(values: Sequence[Any]) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in values)


def _committed_apart(inputs: Sequence[Any]) -> bool:
    """Whether committed inputs sit on different sets of devices, which ``jax.jit`` refuses."""
    placements = {
        frozenset(x.sharding.device_set)
        for x in inputs
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.committed
    }
    return len(placements) > 1


def _placement(leaves: Sequence[Any], states: Sequence[State], values: Sequence[Any]) -> str:
    """Where the arguments and each input state live, for a devices error."""
    return (
        f"the arguments are on device(s) {_devices(leaves)}; {_where(states, values)}. Move a "
        "state next to the arguments with `state.value = jax.device_put(state.value, device)`."
    )


def _where(states: Sequence[State], values: Sequence[Any]) -> str:
    return "; ".join(f"{describe(s)} is on device(s) {_devices(v)}" for s, v in zip(states, values))


def _devices(tree: Any) -> list[int]:
    return sorted({d.id for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) for d in x.devices()})
