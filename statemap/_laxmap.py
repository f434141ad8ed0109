"""LaxMapMapping and map: the memory-bounded sequential mapping, as ``jax.lax.map``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._mapping import MapSpec, StatefulMapping
from ._policy import PolicyName

__all__ = ["LaxMapMapping", "map"]


class LaxMapMapping(StatefulMapping):
    """A stateful ``jax.lax.map``: lanes run one chunk of ``batch_size`` at a time.

    States follow exactly the rules of :func:`statemap.vmap`, and lane i gets
    the same key as under ``vmap``, so the numbers are the same whatever the
    ``batch_size``; only ``batch_size`` lanes are live at once, which bounds
    memory. Lanes cannot talk to each other (no collectives). Build it with
    :func:`statemap.map`, or directly to keep its plans across calls.

    Args:
      fn: the function to map over the leading axis of its arguments.
      batch_size: lanes per chunk, vectorised inside a chunk (None: one at a
        time); a remainder chunk runs when it does not divide the axis size.
      state_in_axes: as in :func:`statemap.vmap`.
      state_out_axes: as in :func:`statemap.vmap`.
      unexpected_out_state_mapping: as in :func:`statemap.vmap`.

    Raises:
      ValueError: if ``batch_size`` is not a positive int or None.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> h = statemap.HiddenState(jnp.zeros((5, 2)), name='h')
      >>> def step(x):
      ...     h.value = h.value + x
      ...     return h.value.sum()
      >>> chunked = statemap.LaxMapMapping(step, batch_size=2, state_in_axes=statemap.HiddenState)
      >>> chunked(jnp.arange(10.0).reshape(5, 2))
      Array([ 1.,  5.,  9., 13., 17.], dtype=float32)
      >>> h.value[:, 1]
      Array([1., 3., 5., 7., 9.], dtype=float32)
    """

    api = "statemap.map"
    programs_check_inputs = True

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        batch_size: int | None = None,
        state_in_axes: Any = None,
        state_out_axes: Any = None,
        unexpected_out_state_mapping: PolicyName | str = "raise",
    ):
        if batch_size is not None and (
            not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
        ):
            raise ValueError(f"{self.api}: `batch_size` must be a positive int or None, got {batch_size!r}.")
        super().__init__(
            fn,
            state_in_axes=state_in_axes,
            state_out_axes=state_out_axes,
            unexpected_out_state_mapping=unexpected_out_state_mapping,
        )
        self.batch_size = batch_size

    def _options(self) -> Hashable:
        return (super()._options(), self.batch_size)

    def _map(self, spec: MapSpec) -> Callable[..., Sequence[Any]]:
        api, size = self.api, spec.axis_size
        chunk = max(min(self.batch_size or 1, size), 1)  # an empty axis runs no chunk of one lane
        stacked = [None if a is None else 0 for a in spec.out_axes]

        def lanes(first: Any, count: int, inputs: Sequence[Any]) -> list[Any]:
            """Lanes ``first .. first + count`` at once; ``inputs`` hold just those lanes."""
            indices = first + jnp.arange(count)
            in_axes = (0, *(None if a is None else 0 for a in spec.in_axes))
            return jax.vmap(spec.lane_fn, in_axes=in_axes, out_axes=stacked, axis_name=spec.axis_name)(
                indices, *inputs
            )

        def run(*inputs: Any) -> list[Any]:
            if any(x.shape[a] != size for x, a in zip(inputs, spec.in_axes) if a is not None):
                raise ValueError(f"{api}: a program for {size} lanes was given another number")
            leading = [x if a is None else jnp.moveaxis(x, a, 0) for x, a in zip(inputs, spec.in_axes)]
            full, rest = divmod(size, chunk)
            outs = _chunks(lanes, leading, spec.in_axes, spec.out_axes, full, chunk)
            if rest:
                tail = [x if a is None else x[full * chunk :] for x, a in zip(leading, spec.in_axes)]
                outs = [_concat(o, t, a) for o, t, a in zip(outs, lanes(full * chunk, rest, tail), spec.out_axes)]
            return [o if a is None else jnp.moveaxis(o, 0, a) for o, a in zip(outs, spec.out_axes)]

        return jax.jit(run, donate_argnums=spec.donated)

    def _resolve_axis_size(self, size: int | None) -> int:
        if size is None:
            raise ValueError(
                f"{self.api}: cannot tell the axis size: no argument is mapped and no state is "
                f"split (check `state_in_axes`). Pass arrays to map over, or split a state."
            )
        return size


def _chunks(
    lanes: Callable[[Any, int, Sequence[Any]], list[Any]],
    leading: Sequence[Any],
    in_axes: Sequence[int | None],
    out_axes: Sequence[int | None],
    full: int,
    chunk: int,
) -> list[Any]:
    """The first ``full * chunk`` lanes, ``chunk`` at a time with ``jax.lax.map``, stacked on axis 0.

    An output the same on every lane (out axis None) comes back once.
    """
    mapped = [i for i, a in enumerate(in_axes) if a is not None]
    shaped = [leading[i][: full * chunk].reshape(full, chunk, *leading[i].shape[1:]) for i in mapped]

    def one(args: tuple[Any, list[Any]]) -> list[Any]:
        start, sliced = args
        inputs = list(leading)
        for i, x in zip(mapped, sliced):
            inputs[i] = x
        return lanes(start, chunk, inputs)

    stacked = jax.lax.map(one, (jnp.arange(full) * chunk, shaped))
    return [o[0] if a is None else o.reshape(full * chunk, *o.shape[2:]) for o, a in zip(stacked, out_axes)]


def _concat(done: Any, tail: Any, axis: int | None) -> Any:
    return done if axis is None else jnp.concatenate([done, tail])


def map(
    fn: Callable[..., Any],
    *xs: Any,
    batch_size: int | None = None,
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: PolicyName | str = "raise",
) -> Any:
    """Map a stateful function over the leading axis of ``xs``, a chunk of lanes at a time.

    The memory-bounded counterpart of :func:`statemap.vmap`, as
    ``jax.lax.map`` is of ``jax.vmap``: the same state semantics and the same
    numbers for the same seed, with at most ``batch_size`` lanes live at once.

    Args:
      fn: the function; it sees one lane of each of ``xs``.
      *xs: arrays (or pytrees) to map over along axis 0.
      batch_size: lanes per chunk (None: one at a time).
      state_in_axes: as in :func:`statemap.vmap`.
      state_out_axes: as in :func:`statemap.vmap`.
      unexpected_out_state_mapping: as in :func:`statemap.vmap`.

    Returns:
      The outputs of ``fn``, stacked along axis 0.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> rng = statemap.RandomState(0)
      >>> noisy = lambda x: x + rng.normal()
      >>> a = statemap.map(noisy, jnp.zeros(6), batch_size=4)
      >>> rng.seed(0)
      >>> b = statemap.vmap(noisy)(jnp.zeros(6))
      >>> bool(jnp.allclose(a, b))
      True
    """
    mapping = LaxMapMapping(
        fn,
        batch_size=batch_size,
        state_in_axes=state_in_axes,
        state_out_axes=state_out_axes,
        unexpected_out_state_mapping=unexpected_out_state_mapping,
    )
    return mapping(*xs)
