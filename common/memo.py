"""A cache that computes each value once, also when threads ask for it together.

The in-process engine runs a cohort's ClientApp calls in threads (`client.cohort`); they ask
for the same σ search, ε and data set at the same moment, and `functools.lru_cache` alone would
let every one of them compute it (a σ search takes seconds).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TypeVar

Value = TypeVar("Value")


def cached(maxsize: int) -> Callable[[Callable[..., Value]], Callable[..., Value]]:
    def wrap(function: Callable[..., Value]) -> Callable[..., Value]:
        memo = functools.lru_cache(maxsize=maxsize)(function)
        lock = threading.RLock()

        @functools.wraps(function)
        def once(*args: object, **kwargs: object) -> Value:
            with lock:
                return memo(*args, **kwargs)

        once.cache_clear = memo.cache_clear  # type: ignore[attr-defined]  # for a process whose files changed
        return once

    return wrap
