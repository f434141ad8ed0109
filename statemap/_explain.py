"""Explanation: a plan shown as a table, for ``mapping.explain(...)``."""

from __future__ import annotations

import weakref

import attrs
import numpy as np
import jax

from ._catalogue import Entry, StateIn
from ._plan import Exit, Plan, StateOut
from ._state import State, label

__all__ = ["Explanation"]


def _label(state: State) -> str:
    name = label(state)
    leaves = jax.tree.leaves(state._value)
    if len(leaves) == 1:
        name += f" {tuple(np.shape(leaves[0]))}"
    return name


def _enters(entry: StateIn, lanes: bool) -> str:
    if entry.entry is Entry.SPLIT:
        return f"split on axis {entry.axis}"
    if entry.entry is Entry.LANE_KEY:
        return "per-lane key"
    return "broadcast" if lanes else "input"


def _leaves(out: StateOut | None, policy_note: str) -> str:
    if out is None:
        return "unchanged"
    if out.exit is Exit.STACKED:
        return f"stacked on axis {out.axis}"
    if out.exit is Exit.REFUSED:
        return f"refused: batched write ({policy_note})"
    return out.exit.value


def _object(state: State) -> str:
    return hex(id(state))


@attrs.frozen
class Explanation:
    """The plan for one call signature; ``str()`` gives a readable table.

    The table has one row per state the plan holds, with the object's
    address (``hex(id(state))``) last: warm calls read and write those very
    objects, so a state replaced by a new object after the plan was made
    (``model['w'] = ParamState(...)``) shows up as a different address.

    Attributes:
      api: the mapping's name, e.g. ``statemap.vmap``.
      function: the mapped function's name.
      plan: the plan the call will run.
      extra: additional lines (devices, for pmap).
      lanes: whether the transform maps over lanes (a mapping) or not (``jit``).
    """

    api: str
    function: str
    plan: Plan
    extra: list[str]
    lanes: bool = True

    @property
    def states(self) -> tuple[State, ...]:
        """The State objects the plan reads, writes or returns, in the table's order.

        Example:
          >>> import jax.numpy as jnp
          >>> import statemap
          >>> w = statemap.ParamState(jnp.ones(2), name='w')
          >>> f = statemap.vmap(lambda x: x * w.value)
          >>> f.explain(jnp.ones((3, 2))).states[0] is w
          True
        """
        held = [ref() for ref in self.plan.refs]
        held += [slot() for slot in self.plan.out_slots if isinstance(slot, weakref.ref)]
        unique = {id(s): s for s in held if s is not None}
        return tuple(unique.values())

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(state, how it enters, how it leaves, object) for every state the plan holds."""
        plan = self.plan
        outs = {id(o.ref()): o for o in plan.outs + plan.advanced}
        entries = {id(ref()): entry for ref, entry in zip(plan.refs, plan.ins)}
        rows = []
        for state in self.states:
            entry = entries.get(id(state))
            if entry is None:
                rows.append((_label(state), "not read", "returned", _object(state)))
            else:
                leaves = _leaves(outs.get(id(state)), "see the call's error")
                rows.append((_label(state), _enters(entry, self.lanes), leaves, _object(state)))
        for proto, out in zip(plan.prototypes, plan.made):
            rows.append((f"{_label(proto)} (new)", "created inside", _leaves(out, ""), "new each call"))
        return rows

    def __str__(self) -> str:
        plan = self.plan
        head = f"{self.api} plan for {self.function}"
        if self.lanes:
            head += f": {plan.axis_size} lanes (axis size from {plan.size_origin})"
        rows = [("state", "enters", "leaves", "object"), *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [head, *self.extra]
        lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
        if plan.refusal is not None:
            lines.append(plan.refusal)
        for message in plan.warnings:
            lines.append(f"warning: {message}")
        return "\n".join(lines)
