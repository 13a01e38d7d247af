"""fedrec's wrappers around the Grid a ServerApp is given.

`WrappedGrid` hands everything to the Grid it wraps; a wrapper overrides only what it changes
(`secagg.SecureGrid`: train rounds through SecAgg+; `PromptGrid`: how often replies are
pulled). Only the Grid's public API is used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

FIRST_WAIT, LONGEST_WAIT = 0.05, 1.0  # seconds between reply pulls: from the first, doubling, at most


class WrappedGrid(Grid):
    """A Grid that hands every call to `grid`."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> Any:  # the in-process grid's snapshot/restore for checkpoints
        return getattr(self._grid, name)

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class PromptGrid(WrappedGrid):
    """The deployed ServerApp's Grid, collecting replies as they arrive.

    flwr 1.42's grid sleeps 3 s between pulls for replies (`superlink/grid/http_grid.py`), and a
    round waits on it at least twice (train, then evaluate): on a small deployment, whose clients
    answer in a second or two, that sleep is most of a round. Here the first pull follows after
    50 ms and the wait doubles up to 1 s, through the Grid's own push and pull; the contract is
    Flower's (all replies, or those in by `timeout`; None waits for all)."""

    def __init__(self, grid: Grid, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(grid)
        self._sleep = sleep

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = FIRST_WAIT
        while True:
            pulled = list(self.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not waiting or (end is not None and time.monotonic() >= end):
                return replies
            self._sleep(wait if end is None else max(0.0, min(wait, end - time.monotonic())))
            wait = min(2 * wait, LONGEST_WAIT)
