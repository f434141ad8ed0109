"""Writing a call's results back: states, created states, and the user's output."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import jax

from ._plan import Plan
from ._state import State, Watcher

__all__ = ["commit", "detached"]


def commit(plan: Plan, outs: Sequence[Any], made: list[State] | None, watcher: Watcher | None) -> Any:
    """Write the program's outputs back to the states and rebuild the user's output.

    ``made`` are the states the function created, on the call that traced it;
    on later calls fresh copies of the plan's prototypes take their place.
    """
    pos = plan.num_user_leaves
    written: list[tuple[Any, Any]] = []
    for out in plan.outs:
        written.append((out.ref(), out.value(outs, pos)))
        pos += out.num_leaves
    if plan.made and made is None:
        made = [copy.copy(p) for p in plan.prototypes]
    created: list[tuple[State, Any]] = []
    for state, out in zip(made or (), plan.made):
        created.append((state, out.value(outs, pos)))
        pos += out.num_leaves
    for out, key in zip(plan.advanced, outs[pos:]):
        written.append((out.ref(), key))
    if watcher is None:
        for state, value in written:
            state._value = value
    else:
        for state, value in written:
            watcher.write(state, value)
    for state, value in created:
        state._value = value
    leaves = outs[: plan.num_user_leaves]
    if plan.returns_states:
        leaves = _with_states(plan, leaves, made or [])
    return jax.tree.unflatten(plan.out_tree, leaves)


def _with_states(plan: Plan, arrays: Sequence[Any], made: list[State]) -> list[Any]:
    """The output leaves: arrays in order, and the States the function returned."""
    remaining = iter(arrays)
    made_index = {id(p): s for p, s in zip(plan.prototypes, made)}
    return [next(remaining) if slot is None else _returned_state(slot, made_index) for slot in plan.out_slots]


def _returned_state(slot: Any, made_index: dict[int, State]) -> State:
    return made_index[id(slot)] if isinstance(slot, State) else slot()


def detached(state: State) -> State:
    """A copy of ``state`` holding nothing: the template for states created on warm calls."""
    clone = copy.copy(state)
    clone._value = None
    return clone
