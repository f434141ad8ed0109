"""The exceptions statemap raises.

Every statemap error subclasses :class:`StatemapError`, and also the built-in
exception a caller would naturally catch, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["AxisNameError", "BatchAxisError", "StateTypeError", "StatemapError", "TracedStateError"]


class StatemapError(Exception):
    """Base class of every error statemap defines.

    Catch it to handle any statemap-specific failure in one place.

    Example:
      >>> from statemap import errors
      >>> try:
      ...     raise errors.BatchAxisError("statemap.vmap: example")
      ... except errors.StatemapError as e:
      ...     print(type(e).__name__, e)
      BatchAxisError statemap.vmap: example
    """


class BatchAxisError(StatemapError, ValueError):
    """A state's batch axis does not fit: an unexpected batched write, or an axis out of range.

    Raised when a mapped function writes a batched value to a state that
    neither ``state_in_axes`` nor ``state_out_axes`` covers (under the default
    ``unexpected_out_state_mapping='raise'``), or when a state is split on an
    axis its value does not have. The message names the state (type, name or
    tag, shape), the axis, and the argument to change. It is also a
    ``ValueError``, and is exported as ``statemap.BatchAxisError``.

    Example:
      >>> from statemap import errors
      >>> issubclass(errors.BatchAxisError, ValueError)
      True
      >>> try:
      ...     raise errors.BatchAxisError("statemap.vmap: example")
      ... except ValueError as e:
      ...     print(isinstance(e, errors.StatemapError))
      True
    """


class StateTypeError(StatemapError, TypeError):
    """A state would change shape or dtype where JAX needs one fixed type.

    Raised when a loop body leaves a state with another shape or dtype than it
    entered with, or when the branches of ``statemap.cond``/``switch`` write a
    state with different shapes or dtypes. The message names the state, both
    types and the fix. It is also a ``TypeError``, as JAX's own carry-type
    errors are.

    Example:
      >>> from statemap import errors
      >>> issubclass(errors.StateTypeError, TypeError)
      True
    """


class AxisNameError(StatemapError, NameError):
    """A collective (``jax.lax.psum``, ``axis_index``, ...) names an axis no mapping binds.

    Raised while the function is traced, instead of JAX's "unbound axis name"
    error. The message names the collective's axis, the names the enclosing
    statemap mappings bind, and the fix (``axis_name=`` on the mapping). It
    is also a ``NameError``, as JAX's own error is.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import statemap
      >>> from statemap import errors
      >>> mean = statemap.vmap(lambda x: jax.lax.pmean(x, 'batch'))
      >>> try:
      ...     mean(jnp.ones(3))
      ... except errors.AxisNameError as e:
      ...     print(isinstance(e, NameError), '`axis_name=` is missing' in str(e))
      True True
    """


class TracedStateError(StatemapError, TypeError):
    """Python control flow (``if``, ``bool()``, ``int()``) on a state's traced value.

    A state's value is an input of the compiled program, so it is a tracer
    while the function is traced, and Python cannot branch on it. Raised
    instead of JAX's ``TracerBoolConversionError`` (or another
    ``ConcretizationTypeError``) when the value comes from a state: the
    message names the state and the fix (``jnp.where``, ``statemap.cond``, or
    a static argument). It is also a ``TypeError``, as JAX's own error is,
    and JAX's error is its ``__cause__``.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> from statemap import errors
      >>> training = statemap.State(jnp.array(True), name='training')
      >>> def step(x):
      ...     if training.value:
      ...         return x * 0.5
      ...     return x
      >>> try:
      ...     statemap.vmap(step)(jnp.ones(3))
      ... except errors.TracedStateError as e:
      ...     print("State 'training'" in str(e), isinstance(e, TypeError))
      True True
    """
