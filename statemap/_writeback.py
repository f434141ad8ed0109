"""Writing a call's results back: states, created states, and the user's output."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from ._plan import Plan
from ._state import State, Watcher

__all__ = ["commit", "detached", "set_value"]

set_value: Callable[[State, Any], None] = State.__dict__["_value"].__set__
"""The states' slot setter: ``any(map(set_value, states, values))`` writes them all in one C loop."""


def commit(plan: Plan, outs: Sequence[Any], made: list[State] | None, watcher: Watcher | None) -> Any:
    """Write the program's outputs back to the states and rebuild the user's output.

    ``made`` are the states the function created, on the call that traced it;
    on later calls fresh copies of the plan's prototypes take their place.
    """
    pos = plan.num_user_leaves
    states: list[Any] = [out.ref() for out in plan.outs]
    if plan.leaf_outs:
        values = list(outs[pos : pos + len(states)])
        pos += len(states)
    else:
        values = []
        for out in plan.outs:
            values.append(out.value(outs, pos))
            pos += out.num_leaves
    if plan.made and made is None:
        made = [copy.copy(p) for p in plan.prototypes]
        if watcher is not None:
            # Copies skip ``State.__init__``, which tells the enclosing trace
            # (an outer mapping's lane) about new states: tell it here.
            for state in made:
                watcher.created(state)
    created: list[Any] = []
    for out in plan.made:
        created.append(out.value(outs, pos))
        pos += out.num_leaves
    for out, key in zip(plan.advanced, outs[pos:]):
        states.append(out.ref())
        values.append(key)
    if watcher is not None:
        for state, value in zip(states, values):
            watcher.write(state, value)
        states, values = [], []
    # One loop in C: an interrupt (KeyboardInterrupt) lands before or after
    # it, never between two writes, so a call is never left half written.
    any(map(set_value, states + (made or []), values + created))
    return _user_output(plan, outs, made or [])


def _user_output(plan: Plan, outs: Sequence[Any], made: list[State]) -> Any:
    """The function's output: its array leaves and the States it returned, in its pytree."""
    leaves = outs[: plan.num_user_leaves]
    if plan.returns_states:
        leaves = _with_states(plan, leaves, made)
    return plan.out_tree.unflatten(leaves)


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
