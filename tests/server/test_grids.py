"""The deployed ServerApp's grid wrapper: every reply collected, pulled after 50 ms, then waits
doubling to 1 s, and Flower's timeout contract kept."""

from __future__ import annotations

import types

from server.grids import FIRST_WAIT, LONGEST_WAIT, PromptGrid


class SlowGrid:
    """Replies to message i become available on pull number `ready[i]`."""

    def __init__(self, ready: list[int]) -> None:
        self.ready = ready
        self.pulls = 0

    def push_messages(self, messages):
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [types.SimpleNamespace(metadata=types.SimpleNamespace(reply_to_message_id=i))
                for i in message_ids if self.ready[int(i)] <= self.pulls]


def test_all_replies_arrive_with_short_then_doubling_waits() -> None:
    slept: list[float] = []
    inner = SlowGrid([1, 3, 9])
    replies = list(PromptGrid(inner, sleep=slept.append).send_and_receive([None] * 3))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1", "2"]
    assert inner.pulls == 9
    assert slept == [FIRST_WAIT, 0.1, 0.2, 0.4, 0.8, LONGEST_WAIT, LONGEST_WAIT, LONGEST_WAIT]


def test_the_timeout_returns_the_replies_in_by_then() -> None:
    slept: list[float] = []
    replies = list(PromptGrid(SlowGrid([1, 10**9]), sleep=slept.append).send_and_receive([None] * 2, timeout=0.0))
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]
    assert slept == []  # past the deadline at the first pull: no wait
