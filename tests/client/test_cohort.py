"""`run_together`: ClientApp calls in threads whose local trainings run as one batch."""

import numpy as np
from flwr.app import Array, ArrayRecord

from client import cohort

START = ArrayRecord({"w": Array(np.zeros(2))})


def test_calls_that_train_nothing_run_and_keep_their_order():
    assert cohort.run_together([lambda i=i: i * i for i in range(5)]) == [0, 1, 4, 9, 16]


def test_a_failing_batch_fails_each_of_its_calls(monkeypatch):
    def broken(model, jobs, cfg, *, epochs):
        raise RuntimeError("no memory")

    monkeypatch.setattr(cohort, "train_clients", broken)

    def call() -> str:
        try:
            cohort.train(START, None, None, epochs=1, model_of=lambda arrays: None)  # type: ignore[arg-type]
        except RuntimeError as error:
            return str(error)
        return "trained"

    assert cohort.run_together([call, call, call]) == ["no memory"] * 3


def test_alone_a_call_trains_at_once(monkeypatch):
    seen = []
    monkeypatch.setattr(cohort, "train_clients", lambda model, jobs, cfg, *, epochs: seen.append(len(jobs)) or ["r"])
    assert cohort.train(None, "job", None, epochs=1, model_of=lambda arrays: None) == "r"  # type: ignore[arg-type]
    assert seen == [1]
