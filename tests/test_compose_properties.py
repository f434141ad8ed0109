"""Differential property test: statemap's own transforms against the same program run eagerly.

hypothesis generates small stateful programs as data: a list of operations on
a few states (an accumulator ``a``, a parameter ``p``, a read-only parameter
``q``, an int32 counter ``c`` and a ``RandomState`` ``r``), some of which nest
further operations inside ``statemap.cond`` / ``switch`` (predicates and
indices from the counter or the argument, so exact under any transform),
``statemap.scan`` / ``for_loop`` / ``fori_loop`` / ``while_loop`` (bounded),
``statemap.jit``, and ``statemap.grad`` / ``value_and_grad`` SGD steps on
``p`` (whose loss may write the counter and draw noise).

The same description is interpreted twice:

* through statemap's transforms, called bare, under ``statemap.jit``, or
  mapped by ``statemap.vmap`` (alone, inside ``jit``, around ``jit``, as the
  step of a ``statemap.for_loop``, which may itself be inside ``jit``),
  ``statemap.pmap``, ``statemap.shard_map`` or ``statemap.map`` (alone or
  inside ``jit``, with a ``batch_size``) (``a``, ``p``, ``c`` split, ``q``
  broadcast, per-lane keys);
* eagerly: branches as Python ``if`` on concrete values, loops as Python
  loops, gradients by ``jax.grad`` with the parameter threaded explicitly,
  and for a mapping one lane at a time on fresh states holding that lane's
  slice and key (lane i's key is ``fold_in(base, i)`` with
  ``new, base = split(parent)``; the parent becomes ``new`` when the program
  draws anywhere).

Outputs and every state's final value must agree after each of two calls
(between which the host changes the read-only ``q``).

Profiles (registered here as ``statemap-compose-ci`` / ``-long``, beside
tests/test_properties.py's ``statemap-ci`` / ``-long``, chosen by the same
``STATEMAP_HYPOTHESIS_PROFILE`` variable):

* ``ci`` (default): 4 examples, derandomized, plus three fixed programs that
  nest every transform (under ``jit(for_loop(vmap))``, ``pmap`` and
  ``jit(map)``); about 16 seconds of CPU.
* ``long``: ``STATEMAP_HYPOTHESIS_PROFILE=long python -m pytest
  tests/test_compose_properties.py``: 300 randomized examples (about 15
  minutes on 2 cores).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_concrete, assert_keys_equal, lane_keys
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import statemap

# On a failure hypothesis's pytest plugin imports its patch writer (and libcst,
# whose DeprecationWarning `filterwarnings = error` would turn into an error).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # pragma: no cover
        pass

# ---------------------------------------------------------------------------
# Profiles.

_COMMON: dict[str, Any] = {
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
settings.register_profile("statemap-compose-ci", derandomize=True, database=None, max_examples=4, **_COMMON)
settings.register_profile("statemap-compose-long", derandomize=False, max_examples=300, **_COMMON)

PROFILE = os.environ.get("STATEMAP_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"STATEMAP_HYPOTHESIS_PROFILE must be 'ci' or 'long', got {PROFILE!r}")
SETTINGS = settings.get_profile(f"statemap-compose-{PROFILE}")

F32 = jnp.float32
N = 3  # the accumulator's and parameters' length

# ---------------------------------------------------------------------------
# The description.


@dataclass(frozen=True)
class AddArg:
    """a = a + scale * x"""

    scale: float


@dataclass(frozen=True)
class MulParam:
    """a = tanh(a * p + 0.1)"""


@dataclass(frozen=True)
class ReadQ:
    """a = a + sin(q) / 2 (q is never written)"""


@dataclass(frozen=True)
class Draw:
    """a = a + r.<dist>((3,)) / 10"""

    dist: str


@dataclass(frozen=True)
class Count:
    """c = c + 1"""


@dataclass(frozen=True)
class Out:
    """out = out + mean(a)"""


@dataclass(frozen=True)
class Grad:
    """An SGD step on p: loss = mean(tanh(a * p + x (+ noise/10))**2), optionally writing c."""

    form: str  # 'state', 'list', 'filter', 'value_and_grad', 'with-argnums'
    lr: float
    counts: bool
    noisy: bool


@dataclass(frozen=True)
class Pred:
    """``c % m == r`` ('count'), or ``x[j] > 0`` ('arg')."""

    kind: str
    m: int = 2
    r: int = 0
    j: int = 0


@dataclass(frozen=True)
class Index:
    """``c + shift`` ('count') or ``floor(2 * x[j])`` ('arg'); may be out of range (clamped)."""

    kind: str
    shift: int = 0
    j: int = 0


@dataclass(frozen=True)
class Cond:
    pred: Pred
    then: tuple
    other: tuple


@dataclass(frozen=True)
class Switch:
    index: Index
    branches: tuple


@dataclass(frozen=True)
class Loop:
    """``kind`` in 'for_loop', 'fori_loop', 'scan', 'while_loop' (k or k+1 steps, by c's parity)."""

    kind: str
    k: int
    body: tuple
    reverse: bool = False  # for_loop and scan


@dataclass(frozen=True)
class Jit:
    body: tuple


# How the whole program is called: bare or under jit (the program sees one member), or
# mapped over members (alone, inside or around jit, or as the step of a 2-step for_loop).
OUTERS = ("bare", "jit", "vmap", "jit(vmap)", "vmap(jit)", "for_loop(vmap)", "jit(for_loop(vmap))", "pmap", "shard_map", "map", "jit(map)")
ON_DEVICES = ("pmap", "shard_map")
MAPS = ("map", "jit(map)")  # statemap.map, with a batch_size
STEPS = 2  # the steps of the for_loop outers


@dataclass(frozen=True)
class Program:
    ops: tuple
    outer: str  # one of OUTERS
    n: int  # lanes, for a mapping
    seed: int
    typed: bool
    batch_size: int | None = None  # for statemap.map


def iter_ops(ops: tuple) -> Any:
    for op in ops:
        yield op
        if isinstance(op, Cond):
            yield from iter_ops(op.then)
            yield from iter_ops(op.other)
        elif isinstance(op, Switch):
            for branch in op.branches:
                yield from iter_ops(branch)
        elif isinstance(op, (Loop, Jit)):
            yield from iter_ops(op.body)


def draws(ops: tuple) -> bool:
    """Whether the program draws from ``r`` anywhere (a mapping's trace then touches it)."""
    return any(isinstance(op, Draw) or (isinstance(op, Grad) and op.noisy) for op in iter_ops(ops))


# ---------------------------------------------------------------------------
# Generating programs.

_LEAVES = st.one_of(
    st.builds(AddArg, st.sampled_from([0.5, 1.0, -1.0])),
    st.just(MulParam()),
    st.just(ReadQ()),
    st.builds(Draw, st.sampled_from(["normal", "uniform"])),
    st.just(Count()),
    st.just(Out()),
    st.builds(
        Grad,
        st.sampled_from(["state", "list", "filter", "value_and_grad", "with-argnums"]),
        st.sampled_from([0.1, 0.5]),
        st.booleans(),
        st.booleans(),
    ),
)
_PREDS = st.one_of(
    st.builds(Pred, st.just("count"), m=st.integers(2, 3), r=st.integers(0, 1)),
    st.builds(Pred, st.just("arg"), j=st.integers(0, N - 1)),
)
_INDICES = st.one_of(
    st.builds(Index, st.just("count"), shift=st.integers(-2, 3)),
    st.builds(Index, st.just("arg"), j=st.integers(0, N - 1)),
)


def _ops(depth: int) -> st.SearchStrategy:
    if depth == 0:
        return _LEAVES
    block = st.lists(_ops(depth - 1), max_size=3).map(tuple)
    nested = st.one_of(
        st.builds(Cond, _PREDS, block, block),
        st.builds(Switch, _INDICES, st.lists(block, min_size=1, max_size=3).map(tuple)),
        st.builds(
            Loop, st.sampled_from(["for_loop", "fori_loop", "scan", "while_loop"]), st.integers(0, 3), block, st.booleans()
        ),
        st.builds(Jit, block),
    )
    return st.one_of(_LEAVES, _LEAVES, nested)


@st.composite
def programs(draw: Any) -> Program:
    ops = tuple(draw(st.lists(_ops(2), min_size=1, max_size=5)))
    outer = draw(st.sampled_from(OUTERS))
    n = draw(st.integers(2, 4 if outer in ON_DEVICES else 3))
    batch_size = draw(st.sampled_from([None, 1, 2, n + 1])) if outer in MAPS else None
    return Program(ops, outer, n, draw(st.integers(0, 2**16)), draw(st.booleans()), batch_size)


# ---------------------------------------------------------------------------
# Interpreting a program: through statemap's transforms, or eagerly.


class Model:
    """The states a program touches."""

    def __init__(self, a: Any, p: Any, q: Any, c: Any, key: Any):
        self.a = statemap.State(a, name="a")
        self.p = statemap.ParamState(p, name="p")
        self.q = statemap.ParamState(q, name="q")
        self.c = statemap.ShortTermState(c, name="c")
        self.r = statemap.RandomState(key, name="r")

    @property
    def states(self) -> list[statemap.State]:
        return [self.a, self.p, self.q, self.c, self.r]


def loss_value(a: Any, p: Any, x: Any, noise: Any) -> Any:
    return jnp.mean(jnp.tanh(a * p + x + noise) ** 2)


class Interpreter:
    """Runs operations; ``staged`` says whether through statemap's transforms or eagerly."""

    def __init__(self, m: Model, staged: bool):
        self.m, self.staged = m, staged
        self.jits: dict[int, Any] = {}

    def run(self, ops: tuple, x: Any, out: Any) -> Any:
        for op in ops:
            out = self.step(op, x, out)
        return out

    def step(self, op: Any, x: Any, out: Any) -> Any:
        m = self.m
        if isinstance(op, AddArg):
            m.a.value = m.a.value + op.scale * x
        elif isinstance(op, MulParam):
            m.a.value = jnp.tanh(m.a.value * m.p.value + 0.1)
        elif isinstance(op, ReadQ):
            m.a.value = m.a.value + jnp.sin(m.q.value) / 2
        elif isinstance(op, Draw):
            m.a.value = m.a.value + getattr(m.r, op.dist)((N,)) / 10
        elif isinstance(op, Count):
            m.c.value = m.c.value + 1
        elif isinstance(op, Out):
            out = out + jnp.mean(m.a.value)
        elif isinstance(op, Grad):
            out = self.grad(op, x, out)
        elif isinstance(op, Cond):
            out = self.cond(op, x, out)
        elif isinstance(op, Switch):
            out = self.switch(op, x, out)
        elif isinstance(op, Loop):
            out = self.loop(op, x, out)
        elif isinstance(op, Jit):
            out = self.jit(op, x, out)
        else:  # pragma: no cover
            raise AssertionError(op)
        return out

    # Gradients.

    def grad(self, op: Grad, x: Any, out: Any) -> Any:
        m = self.m
        if not self.staged:
            noise = m.r.normal((N,)) / 10 if op.noisy else 0.0
            value, g = jax.value_and_grad(lambda p: loss_value(m.a.value, p, x, noise))(m.p.value)
            gx = jax.grad(lambda xx: loss_value(m.a.value, m.p.value, xx, noise))(x)
            if op.counts:
                m.c.value = m.c.value + 1
        else:

            def loss(xx: Any) -> Any:
                if op.counts:
                    m.c.value = m.c.value + 1
                noise = m.r.normal((N,)) / 10 if op.noisy else 0.0
                return loss_value(m.a.value, m.p.value, xx, noise)

            gx = None
            if op.form == "state":
                g, value = statemap.grad(loss, m.p, return_value=True)(x)
            elif op.form == "list":
                [g], value = statemap.grad(loss, [m.p], return_value=True)(x)
            elif op.form == "filter":
                grads, value = statemap.grad(loss, statemap.ParamState, return_value=True)(x)
                assert list(grads) == [m.p]  # q is not read by the loss
                g = grads[m.p]
            elif op.form == "value_and_grad":
                value, g = statemap.value_and_grad(loss, m.p)(x)
            else:
                (g, gx), value = statemap.grad(loss, m.p, argnums=0, return_value=True)(x)
        m.p.value = m.p.value - op.lr * g
        out = out + value
        if op.form == "with-argnums":
            out = out + jnp.sum(gx)
        return out

    # Branches.

    def pred(self, pred: Pred, x: Any) -> Any:
        if pred.kind == "count":
            return self.m.c.value % pred.m == pred.r
        return x[pred.j] > 0

    def index(self, index: Index, x: Any) -> Any:
        if index.kind == "count":
            return self.m.c.value + index.shift
        return jnp.floor(2 * x[index.j]).astype(jnp.int32)

    def cond(self, op: Cond, x: Any, out: Any) -> Any:
        then = lambda o: self.run(op.then, x, o)  # noqa: E731
        other = lambda o: self.run(op.other, x, o)  # noqa: E731
        if self.staged:
            return statemap.cond(self.pred(op.pred, x), then, other, out)
        return then(out) if bool(self.pred(op.pred, x)) else other(out)

    def switch(self, op: Switch, x: Any, out: Any) -> Any:
        branches = [lambda o, ops=ops: self.run(ops, x, o) for ops in op.branches]
        if self.staged:
            return statemap.switch(self.index(op.index, x), branches, out)
        i = min(max(int(self.index(op.index, x)), 0), len(branches) - 1)
        return branches[i](out)

    # Loops.

    def loop(self, op: Loop, x: Any, out: Any) -> Any:
        kind, k, body = op.kind, op.k, op.body
        order = list(reversed(range(k)) if op.reverse else range(k))
        weights = jnp.arange(1, k + 1, dtype=F32)  # ys[t] weighs t + 1: the stacking order matters
        if kind == "for_loop":
            step = lambda t: self.run(body, x, out + t / 10)  # noqa: E731
            if self.staged:
                ys = statemap.for_loop(step, jnp.arange(k, dtype=F32), reverse=op.reverse)
            else:
                ys = {t: step(jnp.float32(t)) for t in order}
                ys = jnp.stack([ys[t] for t in range(k)]) if k else jnp.zeros((0,), F32)
            return out + (weights * ys).sum() / 10
        if kind == "fori_loop":
            step = lambda i, o: self.run(body, x, o + i / 100)  # noqa: E731
            if self.staged:
                return statemap.fori_loop(0, k, step, out)
            for i in range(k):
                out = step(jnp.int32(i), out)
            return out
        if kind == "scan":

            def f(o: Any, t: Any) -> Any:
                o = self.run(body, x, o + t / 10)
                return o, 2 * o

            if self.staged:
                out, ys = statemap.scan(f, out, jnp.arange(k, dtype=F32), reverse=op.reverse)
            else:
                ys = {}
                for t in order:
                    out, ys[t] = f(out, jnp.float32(t))
                ys = jnp.stack([ys[t] for t in range(k)]) if k else jnp.zeros((0,), F32)
            return out + (weights * ys).sum() / 10
        # A while loop of k steps, one more when c is odd (c may change inside).
        test = lambda v: v[0] < k + self.m.c.value % 2  # noqa: E731
        step = lambda v: (v[0] + 1, self.run(body, x, v[1]))  # noqa: E731
        v = (jnp.int32(0), out)
        if self.staged:
            return statemap.while_loop(test, step, v)[1]
        while bool(test(v)):
            v = step(v)
        return v[1]

    def jit(self, op: Jit, x: Any, out: Any) -> Any:
        if not self.staged:
            return self.run(op.body, x, out)
        if id(op) not in self.jits:
            self.jits[id(op)] = statemap.jit(lambda xx, o: self.run(op.body, xx, o))
        return self.jits[id(op)](x, out)

    def program(self, ops: tuple) -> Any:
        def fn(x: Any) -> Any:
            out = self.run(ops, x, jnp.zeros((), F32))
            return out, self.m.a.value

        return fn


# ---------------------------------------------------------------------------
# Running one program both ways.


def initial(prog: Program) -> dict[str, Any]:
    rng = np.random.default_rng(prog.seed)
    lanes = () if prog.outer in ("bare", "jit") else (prog.n,)
    key = jax.random.key(prog.seed) if prog.typed else jax.random.PRNGKey(prog.seed)
    return {
        "a": jnp.asarray(rng.uniform(-1, 1, (*lanes, N)), F32),
        "p": jnp.asarray(rng.uniform(-1, 1, (*lanes, N)), F32),
        "q": jnp.asarray(rng.uniform(-1, 1, (N,)), F32),
        "c": jnp.asarray(rng.integers(0, 4, lanes), jnp.int32),
        "key": key,
    }


def argument(prog: Program, call: int) -> Any:
    """Multiples of 1/4 in [-1.25, 1.25]: exact predicates and indices, some out of range."""
    rng = np.random.default_rng(prog.seed + 1000 * (call + 1))
    lanes = () if prog.outer in ("bare", "jit") else (prog.n,)
    steps = (STEPS,) if "for_loop" in prog.outer else ()
    return jnp.asarray(rng.integers(-5, 6, (*steps, *lanes, N)) / 4, F32)


def transformed(prog: Program, m: Model) -> Any:
    fn = Interpreter(m, staged=True).program(prog.ops)
    split = {0: [m.a, m.p, m.c]}
    if prog.outer == "bare":
        return fn
    if prog.outer == "jit":
        return statemap.jit(fn)
    if prog.outer == "vmap":
        return statemap.vmap(fn, state_in_axes=split)
    if prog.outer == "jit(vmap)":
        return statemap.jit(statemap.vmap(fn, state_in_axes=split))
    if prog.outer == "vmap(jit)":
        return statemap.vmap(statemap.jit(fn), state_in_axes=split)
    if prog.outer == "for_loop(vmap)":
        return lambda xs: statemap.for_loop(statemap.vmap(fn, state_in_axes=split), xs)
    if prog.outer == "jit(for_loop(vmap))":
        return statemap.jit(lambda xs: statemap.for_loop(statemap.vmap(fn, state_in_axes=split), xs))
    if prog.outer == "map":
        return statemap.LaxMapMapping(fn, batch_size=prog.batch_size, state_in_axes=split)
    if prog.outer == "jit(map)":
        return statemap.jit(statemap.LaxMapMapping(fn, batch_size=prog.batch_size, state_in_axes=split))
    if prog.outer == "shard_map":
        return statemap.shard_map(fn, "d", devices=jax.devices()[: prog.n], state_in_axes=split)
    assert prog.outer == "pmap"
    return statemap.pmap(fn, axis_name="d", devices=jax.devices()[: prog.n], state_in_axes=split)


def eager_call(prog: Program, m: Model, x: Any) -> Any:
    """The oracle: the same program, eagerly; a mapping one lane at a time on fresh states."""
    if prog.outer in ("bare", "jit"):
        return Interpreter(m, staged=False).program(prog.ops)(x)
    if "for_loop" in prog.outer:
        outs = [eager_lanes(prog, m, x[t]) for t in range(STEPS)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return eager_lanes(prog, m, x)


def eager_lanes(prog: Program, m: Model, x: Any) -> Any:
    """One mapped call, eagerly: each lane on fresh states holding its slice and its key."""
    new, keys = lane_keys(m.r.value, prog.n)
    outs, lanes = [], []
    for i in range(prog.n):
        lane = Model(m.a.value[i], m.p.value[i], m.q.value, m.c.value[i], keys[i])
        outs.append(Interpreter(lane, staged=False).program(prog.ops)(x[i]))
        lanes.append(lane)
    for name in ("a", "p", "c"):
        getattr(m, name).value = jnp.stack([getattr(lane, name).value for lane in lanes])
    if draws(prog.ops):
        m.r.value = new
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def assert_close(actual: Any, expected: Any, what: str) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert jnp.shape(a) == jnp.shape(e), f"{what}: shape {jnp.shape(a)} != {jnp.shape(e)}"
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-5, err_msg=what)


def check(prog: Program) -> None:
    values = initial(prog)
    mine = Model(values["a"], values["p"], values["q"], values["c"], values["key"])
    eager = Model(values["a"], values["p"], values["q"], values["c"], values["key"])
    fn = transformed(prog, mine)
    for call in range(2):
        if call:
            # The host changes a read-only state between calls: no transform may have baked it in.
            mine.q.value = mine.q.value + 1
            eager.q.value = eager.q.value + 1
        x = argument(prog, call)
        out = fn(x)
        if prog.outer in ON_DEVICES:
            jax.block_until_ready((out, [s.value for s in mine.states]))
        expected = eager_call(prog, eager, x)
        assert_close(out, expected, f"call {call}: outputs")
        for s, e in zip(mine.states, eager.states):
            if isinstance(s, statemap.RandomState):
                assert_keys_equal(s.value, e.value)
            else:
                assert_close(s.value, e.value, f"call {call}: state {s.name}")
        assert_concrete(mine.states)


@SETTINGS
@given(programs())
def test_transformed_program_equals_eager_program(prog: Program) -> None:
    event(f"outer {prog.outer}" + ("" if prog.batch_size is None else f", batch_size {prog.batch_size}"))
    for kind in sorted({type(op).__name__ if not isinstance(op, Loop) else op.kind for op in iter_ops(prog.ops)}):
        event(f"op {kind}")
    check(prog)


# ---------------------------------------------------------------------------
# Fixed programs: every transform at least once, whatever hypothesis draws.

_EVERYTHING = (
    AddArg(1.0),
    Loop("for_loop", 2, (Draw("normal"), Cond(Pred("arg", j=1), (Count(), MulParam()), (Out(),))), reverse=True),
    Switch(Index("count", shift=-1), ((ReadQ(),), (Out(),), (Count(),))),
    Loop("while_loop", 1, (Jit((Grad("filter", 0.5, True, True), Count())),)),
    Loop("scan", 2, (Loop("fori_loop", 2, (Draw("uniform"), Out())),)),
)


@pytest.mark.parametrize("outer", ["jit(for_loop(vmap))", "pmap", "jit(map)"])
def test_every_transform_nested_in_one_program(outer):
    check(Program(_EVERYTHING, outer, 3, seed=7, typed=outer == "pmap"))
