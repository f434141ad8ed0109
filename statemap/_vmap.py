"""VMapMapping and vmap: statemap's stateful ``jax.vmap``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar, overload

import jax

from ._mapping import MISSING, MapSpec, StatefulMapping
from ._policy import PolicyName
from ._transform import validate_only

__all__ = ["VMapMapping", "vmap"]

F = TypeVar("F", bound=Callable[..., Any])


class VMapMapping(StatefulMapping):
    """A stateful ``jax.vmap``: the function runs once per batch element.

    Build it with :func:`statemap.vmap`, or directly with the same keywords.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> scale = statemap.ParamState(jnp.float32(2.0), name='scale')
      >>> statemap.VMapMapping(lambda x: x * scale.value)(jnp.arange(3.0))
      Array([0., 2., 4.], dtype=float32)
    """

    api = "statemap.vmap"
    compile_ahead = True
    programs_check_inputs = True

    def __init__(
        self,
        fn: Callable[..., Any],
        in_axes: Any = 0,
        out_axes: Any = 0,
        *,
        axis_name: Hashable | None = None,
        axis_size: int | None = None,
        spmd_axis_name: Hashable | tuple[Hashable, ...] | None = None,
        static_argnums: int | Sequence[int] = (),
        static_argnames: str | Sequence[str] = (),
        state_in_axes: Any = None,
        state_out_axes: Any = None,
        unexpected_out_state_mapping: PolicyName | str = "raise",
    ):
        super().__init__(
            fn,
            in_axes=in_axes,
            out_axes=out_axes,
            axis_name=axis_name,
            axis_size=axis_size,
            state_in_axes=state_in_axes,
            state_out_axes=state_out_axes,
            unexpected_out_state_mapping=unexpected_out_state_mapping,
            static_argnums=static_argnums,
            static_argnames=static_argnames,
        )
        self.spmd_axis_name = spmd_axis_name

    def _options(self) -> Hashable:
        return (super()._options(), self.spmd_axis_name)

    def _map(self, spec: MapSpec) -> Callable[..., Sequence[Any]]:
        def lane(*inputs: Any) -> list[Any]:
            return spec.lane_fn(jax.lax.axis_index(spec.axis_name), *inputs)

        mapped = jax.vmap(
            lane,
            in_axes=spec.in_axes,
            out_axes=spec.out_axes,
            axis_name=spec.axis_name,
            axis_size=spec.axis_size,
            spmd_axis_name=self.spmd_axis_name,
        )
        return jax.jit(mapped, donate_argnums=spec.donated)

    def _resolve_axis_size(self, size: int | None) -> int:
        if size is None:
            raise ValueError(
                f"{self.api}: cannot tell the axis size: no argument is mapped (check "
                f"`in_axes`) and no state is split (check `state_in_axes`). Map an "
                f"argument, split a state, or pass `axis_size=n` (a State passed as an argument "
                f"gives the size only if the function reads it)."
            )
        return size


@overload
def vmap(
    fn: F,
    in_axes: Any = 0,
    out_axes: Any = 0,
    *,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    spmd_axis_name: Hashable | tuple[Hashable, ...] | None = None,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: PolicyName | str = "raise",
) -> VMapMapping: ...


@overload
def vmap(
    fn: Any = MISSING,
    in_axes: Any = 0,
    out_axes: Any = 0,
    *,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    spmd_axis_name: Hashable | tuple[Hashable, ...] | None = None,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: PolicyName | str = "raise",
) -> Callable[[F], VMapMapping]: ...


def vmap(
    fn: Any = MISSING,
    in_axes: Any = 0,
    out_axes: Any = 0,
    *,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    spmd_axis_name: Hashable | tuple[Hashable, ...] | None = None,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: PolicyName | str = "raise",
) -> Any:
    """Map a stateful function over a batch axis, like ``jax.vmap``.

    States the function reads are broadcast unless ``state_in_axes`` splits
    them; each ``RandomState`` gives every lane its own key; writes come back
    as described in the docs ("Semantics of one call"). Without ``fn``, returns
    a decorator.

    Args:
      fn: the function to map.
      in_axes: as in ``jax.vmap``: an int, None, or a pytree prefix of the
        positional arguments; keyword arguments are mapped on axis 0.
      out_axes: as in ``jax.vmap``.
      axis_name: the name collectives such as ``jax.lax.psum`` use.
      axis_size: the number of lanes when no argument or state is mapped.
      spmd_axis_name: as in ``jax.vmap``.
      static_argnums: positions of arguments that are compile-time constants:
        hashable Python values (a ``training`` flag, a shape) passed unchanged
        to every lane. Each new value (compared with its type: ``1``, ``1.0``
        and ``True`` differ) traces the function anew, as in ``jax.jit``.
      static_argnames: the same, by keyword name. A parameter that can be
        passed either way is static both ways, whichever form named it.
      state_in_axes: ``{axis: filter}`` (or a bare filter for axis 0): states to
        split on entry; ``None`` as the axis marks states broadcast.
      state_out_axes: ``{axis: filter}``: written states to stack on that axis.
      unexpected_out_state_mapping: ``'raise'``, ``'warn'`` or ``'ignore'``, for
        batched writes that nothing places.

    Returns:
      A ``VMapMapping`` (or a decorator making one).

    Raises:
      ValueError, TypeError: for a bad argument, at once (a static argument
        number or name the function does not take included); an unhashable
        static argument is a ``TypeError`` when the call receives it.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> h = statemap.HiddenState(jnp.zeros((3, 2)), name='h')
      >>> @statemap.vmap(state_in_axes={0: statemap.HiddenState})
      ... def step(x):
      ...     h.value = h.value + x
      ...     return h.value.sum()
      >>> step(jnp.ones((3, 2)))
      Array([2., 2., 2.], dtype=float32)
      >>> h.value.shape
      (3, 2)

      A static argument is a Python value every lane sees as it is:

      >>> scale = statemap.ParamState(jnp.float32(2.0), name='scale')
      >>> @statemap.vmap(static_argnames='training')
      ... def layer(x, training=False):
      ...     return x * scale.value if training else x
      >>> layer(jnp.arange(3.0), training=True)
      Array([0., 2., 4.], dtype=float32)
    """
    keywords = dict(
        in_axes=in_axes,
        out_axes=out_axes,
        axis_name=axis_name,
        axis_size=axis_size,
        spmd_axis_name=spmd_axis_name,
        static_argnums=static_argnums,
        static_argnames=static_argnames,
        state_in_axes=state_in_axes,
        state_out_axes=state_out_axes,
        unexpected_out_state_mapping=unexpected_out_state_mapping,
    )
    if fn is MISSING:
        VMapMapping(validate_only, **keywords)
        return lambda f: VMapMapping(f, **keywords)
    return VMapMapping(fn, **keywords)

