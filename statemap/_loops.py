"""Stateful loops: ``scan``, ``for_loop``, ``fori_loop`` and ``while_loop``.

The body is traced once; the states it writes become part of the loop's
carry, the states it only reads are inputs, and after the loop every written
state holds its value from the last iteration, as a Python loop would leave
it. A ``RandomState`` drawn from in the body advances on every iteration.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._body import Body, check_same_structure, check_same_types, sliced, stays_weak, strengthened, trace_body, write_back
from ._state import State, describe
from .errors import StatemapError

__all__ = ["for_loop", "fori_loop", "scan", "while_loop"]

_KEEP_TYPES = (
    "A loop body must leave every state with the shape and dtype it entered with: "
    "write a value of that shape and dtype (cast with `.astype(...)`), or change the "
    "state's value before the loop."
)


def scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
) -> tuple[Any, Any]:
    """``jax.lax.scan`` whose body may read and write states and draw random numbers.

    Gives the same carry, stacked outputs and final states as the Python loop
    ``for x in xs: carry, y = f(carry, x)``.

    Args:
      f: ``f(carry, x) -> (carry, y)``.
      init: the initial carry.
      xs: the values to loop over, along their leading axis (or None).
      length: the number of iterations when ``xs`` is None.
      reverse: loop from the end, as in ``jax.lax.scan``.
      unroll: as in ``jax.lax.scan``.

    Returns:
      ``(final_carry, stacked_ys)``.

    Raises:
      StateTypeError: if the body changes a state's shape or dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> total = statemap.State(jnp.zeros(()), name='total')
      >>> def body(carry, x):
      ...     total.value = total.value + x
      ...     return carry + 1, total.value
      >>> statemap.scan(body, 0, jnp.arange(4.0))
      (Array(4, dtype=int32, weak_type=True), Array([0., 1., 3., 6.], dtype=float32))
      >>> total.value
      Array(6., dtype=float32)
    """
    return _scan("statemap.scan", f, init, xs, length, reverse, unroll)


def _scan(
    api: str, f: Callable[..., Any], init: Any, xs: Any, length: int | None, reverse: bool, unroll: int | bool
) -> tuple[Any, Any]:
    body = _loop_body(api, functools.partial(_pair, api, f), (init, jax.tree.map(sliced, xs)))

    def step(carry: tuple[Any, list[Any]], x: Any) -> tuple[tuple[Any, list[Any]], Any]:
        user, carried = carry
        out, new = _iterate(body, (user, x), carried)
        return (out[0], new), out[1]

    (carry, carried), ys = jax.lax.scan(
        step, (init, _initial(body)), xs, length=length, reverse=reverse, unroll=unroll
    )
    write_back(api, body.written, carried)
    return carry, ys


def for_loop(
    f: Callable[..., Any], *xs: Any, length: int | None = None, reverse: bool = False, unroll: int | bool = 1
) -> Any:
    """Run ``f(*x_t)`` for every slice ``x_t`` of ``xs`` along the leading axis; stack the outputs.

    The body may read and write states and draw random numbers, as in
    :func:`statemap.scan`; a simulation loop over time steps is the typical use.

    Args:
      f: ``f(*x_t) -> y_t``.
      *xs: the values to loop over, along their leading axis.
      length: the number of iterations when no ``xs`` is given.
      reverse: loop from the end.
      unroll: as in ``jax.lax.scan``.

    Returns:
      The stacked outputs of ``f``.

    Raises:
      StateTypeError: if the body changes a state's shape or dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> v = statemap.HiddenState(jnp.zeros(2), name='v')
      >>> def step(i):
      ...     v.value = 0.5 * v.value + i
      ...     return v.value
      >>> statemap.for_loop(step, jnp.arange(3.0))
      Array([[0. , 0. ],
             [1. , 1. ],
             [2.5, 2.5]], dtype=float32)
    """
    _, ys = _scan("statemap.for_loop", lambda c, x: (c, f(*x)), None, xs, length, reverse, unroll)
    return ys


def fori_loop(lower: Any, upper: Any, body_fun: Callable[[Any, Any], Any], init_val: Any) -> Any:
    """``jax.lax.fori_loop`` whose body may read and write states and draw random numbers.

    Args:
      lower: the first index.
      upper: one past the last index.
      body_fun: ``body_fun(i, val) -> val``.
      init_val: the initial loop value.

    Returns:
      The final loop value.

    Raises:
      StateTypeError: if the body changes a state's shape or dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> rng = statemap.RandomState(0)
      >>> draws = statemap.State(jnp.zeros(3), name='draws')
      >>> def body(i, val):
      ...     draws.value = draws.value.at[i].set(rng.uniform())
      ...     return val + 1
      >>> int(statemap.fori_loop(0, 3, body, 0))
      3
      >>> bool(draws.value[0] != draws.value[1])  # a fresh key every iteration
      True
    """
    api = "statemap.fori_loop"
    index = jax.core.ShapedArray((), jnp.result_type(lower, upper))
    body = _loop_body(api, body_fun, (index, init_val))

    def step(i: Any, carry: tuple[Any, list[Any]]) -> tuple[Any, list[Any]]:
        val, carried = carry
        return _iterate(body, (i, val), carried)

    val, carried = jax.lax.fori_loop(lower, upper, step, (init_val, _initial(body)))
    write_back(api, body.written, carried)
    return val


def while_loop(cond_fun: Callable[[Any], Any], body_fun: Callable[[Any], Any], init_val: Any) -> Any:
    """``jax.lax.while_loop`` whose body may read and write states and draw random numbers.

    ``cond_fun`` may read states (it sees their values of that iteration) but
    not write them.

    Args:
      cond_fun: ``cond_fun(val) -> bool scalar``.
      body_fun: ``body_fun(val) -> val``.
      init_val: the initial loop value.

    Returns:
      The final loop value.

    Raises:
      StatemapError: if ``cond_fun`` writes a state.
      StateTypeError: if the body changes a state's shape or dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> total = statemap.State(jnp.float32(0), name='total')
      >>> def body(n):
      ...     total.value = total.value + n
      ...     return n + 1
      >>> statemap.while_loop(lambda n: total.value < 10, body, 0)
      Array(5, dtype=int32, weak_type=True)
      >>> total.value
      Array(10., dtype=float32)
    """
    api = "statemap.while_loop"
    body = _loop_body(api, body_fun, (init_val,))
    cond = trace_body(api, cond_fun, (init_val,), "condition")
    for state in cond.written:
        raise StatemapError(
            f"{api}: `cond_fun` writes {describe(state)}; a loop condition may only read "
            f"states. Write it in `body_fun` instead."
        )

    def test(carry: tuple[Any, list[Any]]) -> Any:
        val, carried = carry
        return cond.run(jax.tree.leaves(val), _inputs(cond, body.written, carried))[0]

    def step(carry: tuple[Any, list[Any]]) -> tuple[Any, list[Any]]:
        val, carried = carry
        return _iterate(body, val, carried)

    val, carried = jax.lax.while_loop(test, step, (init_val, _initial(body)))
    write_back(api, body.written, carried)
    return val


def _pair(api: str, f: Callable[..., Any], carry: Any, x: Any) -> tuple[Any, Any]:
    """``f(carry, x)``, checked while it is traced to return ``(carry, y)``."""
    out = f(carry, x)
    if not (isinstance(out, tuple) and len(out) == 2):
        got = jax.typeof(out).str_short() if isinstance(out, jax.Array) else type(out).__name__
        raise TypeError(f"{api}: the body must return a pair `(carry, y)`, got {got}.")
    return out


def _loop_body(api: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Body:
    """Trace a loop body and check it keeps every state's type."""
    body = trace_body(api, fn, args, "body")
    for state, tree, after in zip(body.written, body.written_trees, body.written_avals):
        value = body.value_of(state)
        check_same_structure(api, state, jax.tree.structure(value), tree, _KEEP_TYPES)
        check_same_types(api, state, [jax.typeof(x) for x in jax.tree.leaves(value)], after, _KEEP_TYPES)
    return body


def _iterate(body: Body, args: Any, carried: list[Any]) -> tuple[Any, list[Any]]:
    """One iteration: the body's output, and the carried states' new values (typed as on entry)."""
    out, new = body.run(jax.tree.leaves(args), _inputs(body, body.written, carried))
    return out, strengthened(new, _weak(body))


def _initial(body: Body) -> list[Any]:
    """The carried states' values on entry: strongly typed, but where the body keeps a weak type."""
    return strengthened([body.value_of(state) for state in body.written], _weak(body))


def _weak(body: Body) -> list[list[bool]]:
    return [stays_weak(body.value_of(s), after) for s, after in zip(body.written, body.written_avals)]


def _inputs(body: Body, written: Sequence[State], carried: Sequence[Any]) -> list[Any]:
    """One value per state ``body`` reads: carried for the loop's written states, else as outside."""
    position = {id(state): i for i, state in enumerate(written)}
    return [
        carried[position[id(state)]] if id(state) in position else value
        for state, value in zip(body.states, body.values)
    ]
