"""What to do with a batched write that no axis spec places."""

from __future__ import annotations

import enum
from typing import Literal

__all__ = ["WritePolicy", "PolicyName"]

PolicyName = Literal["raise", "warn", "ignore"]


class WritePolicy(enum.Enum):
    """``unexpected_out_state_mapping``: raise, stack with a warning, or stack silently."""

    RAISE = "raise"
    WARN = "warn"
    IGNORE = "ignore"

    @classmethod
    def parse(cls, api: str, value: object) -> WritePolicy:
        """Read the policy from its string, naming ``api`` when it is not one."""
        if isinstance(value, cls):
            return value
        for policy in cls:
            if value == policy.value:
                return policy
        raise ValueError(
            f"{api}: `unexpected_out_state_mapping` must be 'raise', 'warn' or "
            f"'ignore', got {value!r}. Use "
            f"`unexpected_out_state_mapping='warn'` to stack such writes along axis 0."
        )
