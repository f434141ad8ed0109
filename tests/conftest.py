"""Give JAX 8 CPU devices, and a collective timeout, before its backend starts."""

import os

_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    # A stuck collective fails the test run within a minute instead of hanging.
    "--xla_cpu_collective_timeout_seconds=60",
)


def _with_flags(existing: str) -> str:
    flags = existing.split()
    names = {flag.split("=")[0] for flag in flags}
    flags += [flag for flag in _XLA_FLAGS if flag.split("=")[0] not in names]
    return " ".join(flags)


os.environ["XLA_FLAGS"] = _with_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402  (XLA_FLAGS must be set first)

try:
    jax.config.update("jax_num_cpu_devices", 8)
except RuntimeError:
    # The backend is already up (a plugin started it); XLA_FLAGS may still have
    # applied, and tests/test_devices.py reports the device count either way.
    pass
