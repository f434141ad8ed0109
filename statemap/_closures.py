"""Values a ``jax.custom_jvp`` function closes over, whose tangents JAX drops."""

from __future__ import annotations

from collections.abc import Sequence

from jax.extend import core

__all__ = ["closing_over"]

_LOOPS = frozenset({"scan", "while"})


def closing_over(jaxpr: core.Jaxpr, differentiated: Sequence[bool]) -> str | None:
    """The name of a ``jax.custom_jvp`` function in ``jaxpr`` closing over a value that depends on the
    ``differentiated`` inputs, or None.

    A custom JVP rule gives tangents for its function's arguments only, and JAX
    treats what the function closes over (``num_consts`` of the call) as
    constants: a gradient flowing through one would be zero without a word.
    Dependence is followed exactly through calls (``jax.jit``, ``checkpoint``,
    custom derivatives) and ``cond``; every value a loop computes depends on
    its inputs if any one does.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> scale = jnp.float32(2.0)
      >>> def f(b, x):
      ...     softplus = jax.custom_jvp(lambda x: jnp.logaddexp(b * x, 0.0) / b)
      ...     softplus.defjvp(lambda p, t: (softplus(p[0]), jax.nn.sigmoid(b * p[0]) * t[0]))
      ...     return softplus(x)
      >>> jaxpr = jax.make_jaxpr(f)(scale, jnp.ones(2)).jaxpr
      >>> closing_over(jaxpr, [True, False]), closing_over(jaxpr, [False, True])
      ('<lambda>', None)
    """
    found: list[str] = []
    _follow(jaxpr, differentiated, found)
    return found[0] if found else None


def _follow(jaxpr: core.Jaxpr, dependent: Sequence[bool], found: list[str]) -> list[bool]:
    """Which outputs of ``jaxpr`` depend on its ``dependent`` inputs; the closing functions met go to ``found``."""
    seen = {v for v, d in zip(jaxpr.invars, dependent) if d}
    for eqn in jaxpr.eqns:
        given = [isinstance(v, core.Var) and v in seen for v in eqn.invars]
        if any(given):
            seen.update(v for v, d in zip(eqn.outvars, _through(eqn, given, found)) if d)
    return [isinstance(v, core.Var) and v in seen for v in jaxpr.outvars]


def _through(eqn: core.JaxprEqn, given: list[bool], found: list[str]) -> list[bool]:
    """Which outputs of ``eqn`` depend on its ``given`` inputs."""
    name = eqn.primitive.name
    if name == "custom_jvp_call" and any(given[: eqn.params["num_consts"]]):
        info = eqn.params["call_jaxpr"].jaxpr.debug_info
        found.append(info.func_name if info is not None else "a jax.custom_jvp function")
    subs = list(core.jaxprs_in_params(eqn.params))
    outs = [not subs] * len(eqn.outvars)
    for sub in subs:
        inner = given[1:] if name == "cond" else given
        if name in _LOOPS or len(sub.invars) != len(inner) or len(sub.outvars) != len(outs):
            _follow(sub, [True] * len(sub.invars), found)
            return [True] * len(outs)
        outs = [a or b for a, b in zip(outs, _follow(sub, inner, found))]
    return outs
