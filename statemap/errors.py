"""The exceptions statemap raises.

Every statemap error subclasses :class:`StatemapError`, and also the built-in
exception a caller would naturally catch, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["BatchAxisError", "StateTypeError", "StatemapError"]


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
