"""Stateful gradients: ``grad`` and ``value_and_grad`` with respect to states and arguments."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import jax
import jax.numpy as jnp

from ._body import Body, trace_body, write_back
from ._closures import closing_over
from ._filters import to_predicate
from ._state import State, describe, label
from ._transform import MISSING

__all__ = ["grad", "value_and_grad"]


@attrs.frozen
class _Wrt:
    """What ``grad_states`` selects: explicit States (kept in their structure), or a filter."""

    states: tuple[State, ...] | None
    treedef: Any
    predicate: Callable[[tuple[Any, ...], State], bool] | None

    @classmethod
    def parse(cls, api: str, grad_states: Any) -> _Wrt | None:
        if grad_states is None:
            return None
        if isinstance(grad_states, State) or (
            isinstance(grad_states, (list, tuple, dict))
            and grad_states
            and all(isinstance(s, State) for s in jax.tree.leaves(grad_states, is_leaf=_is_state))
        ):
            leaves, treedef = jax.tree.flatten(grad_states, is_leaf=_is_state)
            return cls(tuple(leaves), treedef, None)
        try:
            predicate = to_predicate(grad_states)
        except TypeError as err:
            raise TypeError(f"{api}: `grad_states` must be a State, a list/tuple/dict of States, or a filter. {err}") from None
        return cls(None, None, predicate)

    def select(self, api: str, body: Body) -> list[State]:
        """The states to differentiate, each once, in the order their gradients are reported.

        A filter keeps only floating-point states (a step counter or a key has
        no gradient); a State named explicitly must be floating-point.
        """
        if self.states is not None:
            chosen = list({id(s): s for s in self.states}.values())
            outside = {id(s): v for s, v in zip(body.states, body.values)}
            for state in chosen:
                value = outside[id(state)] if id(state) in outside else state.value
                if not _differentiable(value):
                    raise TypeError(
                        f"{api}: `grad_states` names {describe(state)}, whose value is not floating-point "
                        f"({_dtypes(value)}), so it has no gradient. Leave it out of `grad_states`."
                    )
            reads = any(any(s is t for t in body.states) for s in chosen)
        else:
            assert self.predicate is not None
            pairs = zip(body.states, body.values)
            chosen = [s for s, v in pairs if self.predicate(_path(s), s) and _differentiable(v)]
            reads = bool(chosen)
        if not reads:
            read = ", ".join(label(s) for s in body.states) or "no state at all"
            raise ValueError(
                f"{api}: `grad_states` selects no floating-point state the function reads (it reads {read}). "
                f"Select states the loss depends on, or differentiate arguments with `argnums`."
            )
        return chosen

    def structure(self, states: list[State], grads: list[Any]) -> Any:
        if self.states is not None:
            by_state = {id(s): g for s, g in zip(states, grads)}
            return jax.tree.unflatten(self.treedef, [by_state[id(s)] for s in self.states])
        return dict(zip(states, grads))


def _differentiable(value: Any) -> bool:
    return all(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in jax.tree.leaves(value))


def _dtypes(value: Any) -> str:
    return ", ".join(sorted({str(jnp.result_type(x)) for x in jax.tree.leaves(value)}))


def _is_state(x: Any) -> bool:
    return isinstance(x, State)


def _path(state: State) -> tuple[Any, ...]:
    return () if state.name is None else (state.name,)


def _argnums(api: str, argnums: Any) -> tuple[int, ...] | int | None:
    if argnums is None or (isinstance(argnums, int) and not isinstance(argnums, bool)):
        return argnums
    if isinstance(argnums, (tuple, list)) and all(isinstance(i, int) and not isinstance(i, bool) for i in argnums):
        if len(set(argnums)) < len(argnums):
            raise TypeError(f"{api}: `argnums` {argnums!r} names an argument more than once. Name each once.")
        return tuple(argnums)
    raise TypeError(f"{api}: `argnums` must be an int, a tuple of ints or None, got {argnums!r}.")


def _positions(api: str, argnums: tuple[int, ...], args: tuple[Any, ...]) -> tuple[int, ...]:
    """``argnums`` as non-negative positions in ``args``, checked against their number."""
    n = len(args)
    for i in argnums:
        if not -n <= i < n:
            raise TypeError(
                f"{api}: `argnums` differentiates positional argument {i}, but the function was "
                f"called with {n} positional argument(s). Pass it, or change `argnums`."
            )
    positions = tuple(i % n for i in argnums)
    if len(set(positions)) < len(positions):
        raise TypeError(f"{api}: `argnums` {argnums!r} names an argument more than once. Name each once.")
    return positions


@attrs.frozen
class _Gradient:
    """One configured gradient transform; ``run`` returns (value, aux, state grads, arg grads)."""

    api: str
    fn: Callable[..., Any]
    wrt: _Wrt | None
    argnums: tuple[int, ...] | int | None
    has_aux: bool

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
        body = trace_body(self.api, functools.partial(self.fn, **kwargs), args)
        self._check_loss(body)
        chosen = [] if self.wrt is None else self.wrt.select(self.api, body)
        _refuse_closed_over(self.api, body, chosen)
        nums = () if self.argnums is None else (self.argnums,) if isinstance(self.argnums, int) else self.argnums
        nums = _positions(self.api, nums, args)
        outside = {id(s): v for s, v in zip(body.states, body.values)}
        start = [outside[id(s)] if id(s) in outside else jnp.zeros_like(s.value) for s in chosen]

        def pure(values: list[Any], *diff_args: Any) -> tuple[Any, tuple[Any, Any, list[Any]]]:
            given = {id(s): v for s, v in zip(chosen, values)}
            full = list(args)
            for i, a in zip(nums, diff_args):
                full[i] = a
            out, new = body.run(jax.tree.leaves(tuple(full)), [given.get(id(s), v) for s, v in zip(body.states, body.values)])
            loss, aux = out if self.has_aux else (out, None)
            return loss, (loss, aux, new)

        wrt = (0, *range(1, len(nums) + 1))
        grads, (loss, aux, new) = jax.grad(pure, argnums=wrt, has_aux=True)(start, *[args[i] for i in nums])
        write_back(self.api, body.written, new)
        state_grads = None if self.wrt is None else self.wrt.structure(chosen, grads[0])
        arg_grads = grads[1] if isinstance(self.argnums, int) else tuple(grads[1:])
        return loss, aux, state_grads, arg_grads

    def _check_loss(self, body: Body) -> None:
        avals = jax.tree.unflatten(body.out_tree, body.lane.out_avals[: body.num_out])
        if self.has_aux and not (isinstance(avals, (tuple, list)) and len(avals) == 2):
            raise TypeError(f"{self.api}: with `has_aux=True` the function must return a pair `(loss, aux)`.")
        loss = avals[0] if self.has_aux else avals
        if not (isinstance(loss, jax.core.ShapedArray) and loss.shape == () and jnp.issubdtype(loss.dtype, jnp.inexact)):
            raise TypeError(
                f"{self.api}: the function must return a scalar floating-point loss (shape ()), "
                f"got {getattr(loss, 'str_short', lambda: repr(loss))()}. Reduce it (`.sum()`, "
                f"`.mean()`), or return extra values as aux with `has_aux=True`."
            )

    def grads(self, state_grads: Any, arg_grads: Any) -> Any:
        if self.wrt is None:
            return arg_grads
        return state_grads if self.argnums is None else (state_grads, arg_grads)


def _refuse_closed_over(api: str, body: Body, chosen: Sequence[State]) -> None:
    """Raise if a ``jax.custom_jvp`` function reads a ``chosen`` state: JAX would drop its gradient."""
    num_args = len(body.lane.jaxpr.invars) - sum(len(jax.tree.leaves(v)) for v in body.values)

    def reading(wanted: Sequence[State]) -> str | None:
        ids = {id(s) for s in wanted}
        mask = [False] * num_args
        for state, value in zip(body.states, body.values):
            mask += [id(state) in ids] * len(jax.tree.leaves(value))
        return closing_over(body.lane.jaxpr, mask)

    if not chosen or reading(chosen) is None:
        return
    state, function = next((s, f) for s in chosen if (f := reading([s])) is not None)
    raise TypeError(
        f"{api}: the jax.custom_jvp function {function!r} reads {describe(state)} (or a value "
        f"computed from it) without taking it as an argument. Its JVP rule gives tangents for its "
        f"arguments only, so JAX would take the gradient with respect to {label(state)} through it as "
        f"zero. Pass the value as an argument of the custom_jvp function (`f(x, state.value)`) and "
        f"give it a tangent in the rule."
    )


def _make(api: str, fn: Any, grad_states: Any, argnums: Any, has_aux: bool) -> _Gradient:
    if not callable(fn):
        raise TypeError(f"{api}: `fn` must be callable, got {type(fn).__name__}: {fn!r}.")
    wrt = _Wrt.parse(api, grad_states)
    nums = _argnums(api, argnums)
    return _Gradient(api, fn, wrt, 0 if wrt is None and nums is None else nums, has_aux)


def grad(
    fn: Any = MISSING,
    grad_states: Any = None,
    *,
    argnums: int | Sequence[int] | None = None,
    has_aux: bool = False,
    return_value: bool = False,
) -> Any:
    """Gradients of a stateful function with respect to states and/or arguments.

    The function may read and write states (running statistics it writes are
    written back) and draw random numbers; it is traced once per call.

    Args:
      fn: returns a scalar loss (or ``(loss, aux)`` with ``has_aux``).
      grad_states: a ``State``, a list/tuple/dict of States (gradients come in
        the same structure; a state named twice gets its gradient twice), or a
        filter (gradients come as a dict from each selected floating-point state
        the function reads to its gradient, in first-touch order; counters and
        keys have no gradient and are left out).
      argnums: positional arguments to differentiate, as in ``jax.grad``; with
        neither this nor ``grad_states``, argument 0.
      has_aux: the function returns ``(loss, aux)``.
      return_value: also return the loss.

    Returns:
      A function returning ``grads``, ``(grads, value)``, ``(grads, aux)`` or
      ``(grads, value, aux)``; ``grads`` is ``(state_grads, arg_grads)`` when
      both states and arguments are differentiated. Without ``fn``, a decorator.

    Raises:
      TypeError: for a bad argument (``argnums`` repeated or out of range, a
        State in ``grad_states`` that is not floating-point), or a loss that is
        not a float scalar.
      ValueError: if ``grad_states`` selects no floating-point state the function reads.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> w = statemap.ParamState(jnp.array([1.0, 2.0]), name='w')
      >>> calls = statemap.ShortTermState(jnp.int32(0), name='calls')
      >>> def loss(x):
      ...     calls.value = calls.value + 1
      ...     return (w.value * x).sum() ** 2
      >>> statemap.grad(loss, w)(jnp.ones(2))
      Array([6., 6.], dtype=float32)
      >>> g, value = statemap.grad(loss, [w], return_value=True)(jnp.ones(2))
      >>> g, value, int(calls.value)
      ([Array([6., 6.], dtype=float32)], Array(9., dtype=float32), 2)
    """
    if fn is MISSING:
        _make("statemap.grad", _placeholder, grad_states, argnums, has_aux)
        return lambda f: grad(f, grad_states, argnums=argnums, has_aux=has_aux, return_value=return_value)
    gradient = _make("statemap.grad", fn, grad_states, argnums, has_aux)

    @functools.wraps(fn)
    def grad_fn(*args: Any, **kwargs: Any) -> Any:
        loss, aux, state_grads, arg_grads = gradient.run(args, kwargs)
        grads = gradient.grads(state_grads, arg_grads)
        extra = (*((loss,) if return_value else ()), *((aux,) if has_aux else ()))
        return (grads, *extra) if extra else grads

    return grad_fn


def value_and_grad(
    fn: Any = MISSING,
    grad_states: Any = None,
    *,
    argnums: int | Sequence[int] | None = None,
    has_aux: bool = False,
) -> Any:
    """Like :func:`statemap.grad`, returning ``(value, grads)`` in ``jax.value_and_grad``'s order.

    With ``has_aux``, returns ``((value, aux), grads)``.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> w = statemap.ParamState(jnp.array([1.0, 2.0]), name='w')
      >>> value, grads = statemap.value_and_grad(lambda x: (w.value * x).sum(), statemap.ParamState)(jnp.ones(2))
      >>> value, [(s.name, g) for s, g in grads.items()]
      (Array(3., dtype=float32), [('w', Array([1., 1.], dtype=float32))])
    """
    if fn is MISSING:
        _make("statemap.value_and_grad", _placeholder, grad_states, argnums, has_aux)
        return lambda f: value_and_grad(f, grad_states, argnums=argnums, has_aux=has_aux)
    gradient = _make("statemap.value_and_grad", fn, grad_states, argnums, has_aux)

    @functools.wraps(fn)
    def value_and_grad_fn(*args: Any, **kwargs: Any) -> Any:
        loss, aux, state_grads, arg_grads = gradient.run(args, kwargs)
        grads = gradient.grads(state_grads, arg_grads)
        return ((loss, aux), grads) if has_aux else (loss, grads)

    return value_and_grad_fn


def _placeholder(*args: Any) -> None:
    """Stands in for the function when ``grad(...)`` checks its arguments before decorating."""

