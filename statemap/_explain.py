"""Explanation: a plan shown as a table, for ``mapping.explain(...)``."""

from __future__ import annotations

import attrs
import jax

from ._catalogue import Entry, StateIn
from ._plan import Exit, Plan, StateOut
from ._state import State, label

__all__ = ["Explanation"]


def _label(state: State) -> str:
    name = label(state)
    leaves = jax.tree.leaves(state._value)
    if len(leaves) == 1:
        name += f" {tuple(leaves[0].shape)}"
    return name


def _enters(entry: StateIn) -> str:
    if entry.entry is Entry.SPLIT:
        return f"split on axis {entry.axis}"
    return "per-lane key" if entry.entry is Entry.LANE_KEY else "broadcast"


def _leaves(out: StateOut | None, policy_note: str) -> str:
    if out is None:
        return "unchanged"
    if out.exit is Exit.STACKED:
        return f"stacked on axis {out.axis}"
    if out.exit is Exit.REFUSED:
        return f"refused: batched write ({policy_note})"
    return out.exit.value


@attrs.frozen
class Explanation:
    """The plan for one call signature; ``str()`` gives a readable table.

    Attributes:
      api: the mapping's name, e.g. ``statemap.vmap``.
      function: the mapped function's name.
      plan: the plan the call will run.
      extra: additional lines (devices, for pmap).
    """

    api: str
    function: str
    plan: Plan
    extra: list[str]

    def rows(self) -> list[tuple[str, str, str]]:
        """(state, how it enters, how it leaves) for every state the call touches."""
        plan = self.plan
        outs = {id(o.ref()): o for o in plan.outs + plan.advanced}
        rows = []
        for ref, entry in zip(plan.refs, plan.ins):
            state = ref()
            if state is not None:
                rows.append((_label(state), _enters(entry), _leaves(outs.get(id(state)), "see the call's error")))
        for proto, out in zip(plan.prototypes, plan.made):
            rows.append((f"{_label(proto)} (new)", "created inside", _leaves(out, "")))
        return rows

    def __str__(self) -> str:
        plan = self.plan
        head = f"{self.api} plan for {self.function}: {plan.axis_size} lanes (axis size from {plan.size_origin})"
        rows = [("state", "enters", "leaves"), *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [head, *self.extra]
        lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]
        if plan.refusal is not None:
            lines.append(plan.refusal)
        for message in plan.warnings:
            lines.append(f"warning: {message}")
        return "\n".join(lines)
