"""JitTransform and jit: statemap's stateful ``jax.jit``."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import jax

from ._call import Call
from ._donation import donatable
from ._plan import Exit, Plan, StateOut
from ._planner import Decisions, LaneOutputs, make_lane_fn
from ._state import State
from ._transform import MISSING, StatefulTransform, validate_only

__all__ = ["JitTransform", "jit"]

F = TypeVar("F", bound=Callable[..., Any])


class JitTransform(StatefulTransform):
    """A stateful ``jax.jit``: the function is traced once per signature and compiled.

    States the function reads are inputs of the compiled program (never
    constants), states it writes are its outputs, written back after each
    call; a ``RandomState`` advances exactly as it would eagerly. Build it
    with :func:`statemap.jit`.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> total = statemap.State(jnp.zeros(()), name='total')
      >>> def add(x):
      ...     total.value = total.value + x.sum()
      ...     return total.value
      >>> step = statemap.JitTransform(add)
      >>> step(jnp.ones(3)), step(jnp.ones(3))
      (Array(3., dtype=float32), Array(6., dtype=float32))
    """

    api = "statemap.jit"
    compile_ahead = True
    programs_check_inputs = True

    def _build(self, call: Call) -> tuple[Plan, list[State]]:
        sizes = call.sizes.copy()
        lane, recorder, outputs = self._trace(call, sizes, None, None)
        lane_fn = make_lane_fn(lane, len(call.leaves), list(recorder.inputs.values()), _no_lane_keys)
        decisions = _written_as_is(outputs)
        donated = donatable(call, lane, recorder, outputs, decisions, 1)
        program = jax.jit(functools.partial(lane_fn, 0), donate_argnums=(*call.donated_leaves, *donated))
        plan = self._assemble(call, lane, recorder, outputs, decisions, program, donated=donated)
        return plan, list(recorder.made)


def _written_as_is(outputs: LaneOutputs) -> Decisions:
    """Every written or created state leaves with the value the function gave it."""

    def as_is(written: list[tuple[State, Any, int]]) -> tuple[StateOut, ...]:
        return tuple(StateOut(weakref.ref(s), Exit.AS_IS, None, treedef, n) for s, treedef, n in written)

    return Decisions([], as_is(outputs.written), as_is(outputs.made), (), None, ())


def _no_lane_keys(key: jax.Array, lane_index: Any) -> jax.Array:
    raise AssertionError("statemap.jit has no lanes")  # pragma: no cover


@overload
def jit(
    fn: F,
    *,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    donate_argnums: int | Sequence[int] = (),
) -> JitTransform: ...


@overload
def jit(
    fn: Any = MISSING,
    *,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    donate_argnums: int | Sequence[int] = (),
) -> Callable[[F], JitTransform]: ...


def jit(
    fn: Any = MISSING,
    *,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    donate_argnums: int | Sequence[int] = (),
) -> Any:
    """Compile a stateful function, like ``jax.jit``.

    The function may read and write states and draw random numbers; it runs
    in Python once per signature, and warm calls run the compiled program on
    the states' current values, giving the same outputs and final states as
    running it eagerly. Mappings, loops, branches and ``grad`` nest inside.
    Without ``fn``, returns a decorator.

    Args:
      fn: the function to compile.
      static_argnums: positional arguments that are hashable compile-time
        constants; a new value (or type) is a new trace.
      static_argnames: the same, by keyword name.
      donate_argnums: positional arguments whose buffers may be reused.

    Returns:
      A ``JitTransform`` (or a decorator making one).

    Raises:
      TypeError: for a bad argument, at once.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import statemap
      >>> w = statemap.ParamState(jnp.ones(3), name='w')
      >>> steps = statemap.ShortTermState(jnp.int32(0), name='steps')
      >>> @statemap.jit
      ... def sgd(x):
      ...     loss, g = jax.value_and_grad(lambda w: ((w * x).sum() - 1.0) ** 2)(w.value)
      ...     w.value = w.value - 0.1 * g
      ...     steps.value = steps.value + 1
      ...     return loss
      >>> [round(float(sgd(jnp.ones(3))), 4) for _ in range(2)]
      [4.0, 0.64]
      >>> int(steps.value)
      2
    """
    keywords: dict[str, Any] = dict(
        static_argnums=static_argnums, static_argnames=static_argnames, donate_argnums=donate_argnums
    )
    if fn is MISSING:
        JitTransform(validate_only, **keywords)
        return lambda f: JitTransform(f, **keywords)
    return JitTransform(fn, **keywords)

