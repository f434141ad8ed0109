"""Writing a call's results back: states, created states, and the user's output."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import jax

from ._plan import Plan
from ._state import State, Watcher, write_through

__all__ = ["commit", "detached"]


def commit(plan: Plan, outs: Sequence[Any], made: list[State] | None, watcher: Watcher | None) -> Any:
    """Write the program's outputs back to the states and rebuild the user's output."""
    pos = plan.num_user_leaves
    updates: list[tuple[Any, Any]] = []
    for out in plan.outs:
        updates.append((out.ref(), out.value(outs, pos)))
        pos += out.num_leaves
    made = made if made is not None else [copy.copy(p) for p in plan.prototypes]
    created: list[tuple[State, Any]] = []
    for state, out in zip(made, plan.made):
        created.append((state, out.value(outs, pos)))
        pos += out.num_leaves
    for out, key in zip(plan.advanced, outs[pos:]):
        updates.append((out.ref(), key))
    for state, value in updates:
        write_through(watcher, state, value)
    for state, value in created:
        state._value = value
    arrays = iter(outs[: plan.num_user_leaves])
    made_index = {id(p): s for p, s in zip(plan.prototypes, made)}
    leaves = [next(arrays) if slot is None else _returned_state(slot, made_index) for slot in plan.out_slots]
    return jax.tree.unflatten(plan.out_tree, leaves)


def _returned_state(slot: Any, made_index: dict[int, State]) -> State:
    return made_index[id(slot)] if isinstance(slot, State) else slot()


def detached(state: State) -> State:
    """A copy of ``state`` holding nothing: the template for states created on warm calls."""
    clone = copy.copy(state)
    clone._value = None
    return clone
