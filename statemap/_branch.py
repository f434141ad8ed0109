"""Stateful branches: ``cond`` and ``switch``.

Every branch is traced once. The branch taken writes its states; a state
that another branch writes keeps its value, as with a Python ``if``. A
``RandomState`` advances only when the branch taken draws from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from ._body import Body, check_same_structure, check_same_types, stays_weak, strengthened, trace_body, write_back
from ._identity import IdentityDict
from ._state import State

__all__ = ["cond", "switch"]


def cond(pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any], *operands: Any) -> Any:
    """``jax.lax.cond`` whose branches may read and write states and draw random numbers.

    Gives the same output and final states as ``true_fn(*operands) if pred
    else false_fn(*operands)``.

    Args:
      pred: a boolean scalar.
      true_fn: the branch taken when ``pred`` is true.
      false_fn: the branch taken otherwise.
      *operands: the branches' arguments.

    Returns:
      The output of the branch taken.

    Raises:
      TypeError: if a branch is not callable, or creates or returns a State.
      StateTypeError: if the branches leave a state with different shapes or dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> hits = statemap.State(jnp.int32(0), name='hits')
      >>> def hit(x):
      ...     hits.value = hits.value + 1
      ...     return x * 2
      >>> statemap.cond(jnp.array(True), hit, lambda x: x, jnp.float32(3))
      Array(6., dtype=float32)
      >>> statemap.cond(jnp.array(False), hit, lambda x: x, jnp.float32(3))
      Array(3., dtype=float32)
      >>> int(hits.value)
      1
    """
    api = "statemap.cond"
    for name, fn in (("true_fn", true_fn), ("false_fn", false_fn)):
        if not callable(fn):
            raise TypeError(f"{api}: `{name}` must be callable, got {type(fn).__name__}: {fn!r}.")
    return _branch(api, lambda fns, ops, vals: jax.lax.cond(pred, *fns, ops, vals), [true_fn, false_fn], operands)


def switch(index: Any, branches: Sequence[Callable[..., Any]], *operands: Any) -> Any:
    """``jax.lax.switch`` whose branches may read and write states and draw random numbers.

    Args:
      index: an integer scalar; clamped to the branches, as in ``jax.lax.switch``.
      branches: the functions to choose from.
      *operands: the branches' arguments.

    Returns:
      The output of the branch chosen.

    Raises:
      TypeError: if ``branches`` is not a non-empty sequence of callables, or a
        branch creates or returns a State.
      StateTypeError: if the branches leave a state with different shapes or dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> last = statemap.State(jnp.float32(0), name='last')
      >>> def keep(x):
      ...     last.value = x
      ...     return x
      >>> statemap.switch(1, [lambda x: -x, keep, lambda x: x + 1], jnp.float32(5))
      Array(5., dtype=float32)
      >>> last.value
      Array(5., dtype=float32)
    """
    api = "statemap.switch"
    branches = list(branches)
    if not branches or not all(callable(b) for b in branches):
        raise TypeError(f"{api}: `branches` must be a non-empty sequence of callables, got {branches!r}.")
    return _branch(api, lambda fns, ops, vals: jax.lax.switch(index, fns, ops, vals), branches, operands)


def _branch(
    api: str,
    choose: Callable[[list[Callable[..., Any]], Any, list[Any]], Any],
    fns: Sequence[Callable[..., Any]],
    operands: tuple[Any, ...],
) -> Any:
    bodies = [trace_body(api, fn, operands, f"branch {i}") for i, fn in enumerate(fns)]
    states, values = _union(bodies, lambda b: zip(b.states, b.values))
    written = list(_union(bodies, lambda b: ((s, None) for s in b.written))[0])
    _check_types(api, states, values, bodies)
    position = {id(state): i for i, state in enumerate(states)}
    weak = _weak(states, values, written, bodies)

    def as_branch(body: Body) -> Callable[[Any, list[Any]], tuple[Any, list[Any]]]:
        def run(ops: Any, vals: list[Any]) -> tuple[Any, list[Any]]:
            out, new = body.run(jax.tree.leaves(ops), [vals[position[id(s)]] for s in body.states])
            mine = {id(s): v for s, v in zip(body.written, new)}
            kept = [mine.get(id(s), vals[position[id(s)]]) for s in written]
            return out, strengthened(kept, [weak[id(s)] for s in written])

        return run

    entering = strengthened(values, [weak.get(id(s), [False] * len(jax.tree.leaves(v))) for s, v in zip(states, values)])
    arrays = [x for x in jax.tree.leaves(operands) if not isinstance(x, State)]  # States are read, not passed
    out, new = choose([as_branch(b) for b in bodies], arrays, entering)
    write_back(api, written, new)
    return out


def _weak(states: list[State], values: list[Any], written: list[State], bodies: Sequence[Body]) -> dict[int, list[bool]]:
    """For each written state's leaves (by state id): weakly typed on entry and after every branch."""
    value = {id(s): v for s, v in zip(states, values)}
    left = [dict(zip(map(id, body.written), body.written_avals)) for body in bodies]
    return {
        id(s): stays_weak(value[id(s)], *(by_id.get(id(s), jax.tree.leaves(value[id(s)])) for by_id in left))
        for s in written
    }


def _union(bodies: Sequence[Body], pairs: Callable[[Body], Any]) -> tuple[list[State], list[Any]]:
    """States in first-seen order across the branches, each with its first-seen value."""
    seen: IdentityDict[State, Any] = IdentityDict()
    for body in bodies:
        for state, value in pairs(body):
            if state not in seen:
                seen[state] = value
    return list(seen), list(seen.values())


def _check_types(api: str, states: list[State], values: list[Any], bodies: Sequence[Body]) -> None:
    """Every branch must leave each state it writes with the type it had (an untouched one keeps its own)."""
    before = {id(s): [jax.typeof(x) for x in jax.tree.leaves(v)] for s, v in zip(states, values)}
    trees = {id(s): jax.tree.structure(v) for s, v in zip(states, values)}
    for i, body in enumerate(bodies):
        fix = (
            f"Branch {i} must leave it with the structure, shapes and dtypes it has before the "
            f"branch, as every branch must (a branch that does not write it keeps it as it is)."
        )
        for state, tree, after in zip(body.written, body.written_trees, body.written_avals):
            check_same_structure(api, state, trees[id(state)], tree, fix)
            check_same_types(api, state, before[id(state)], after, fix)
