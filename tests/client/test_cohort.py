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
            cohort.train(START, None, None, epochs=1, model_of=lambda arrays: None,  # type: ignore[arg-type]
                         encode=lambda weights: START)
        except RuntimeError as error:
            return str(error)
        return "trained"

    assert cohort.run_together([call, call, call]) == ["no memory"] * 3


class _Result:
    weights = {"w": "trained"}


def test_alone_a_call_trains_at_once(monkeypatch):
    seen = []
    monkeypatch.setattr(cohort, "train_clients",
                        lambda model, jobs, cfg, *, epochs: seen.append(len(jobs)) or [_Result()])
    result, arrays = cohort.train(None, "job", None, epochs=1, model_of=lambda arrays: None,  # type: ignore[arg-type]
                                  encode=lambda weights: weights["w"])
    assert isinstance(result, _Result) and arrays == "trained"
    assert seen == [1]


def test_a_failing_encoding_fails_only_its_own_call(monkeypatch):
    monkeypatch.setattr(cohort, "train_clients", lambda model, jobs, cfg, *, epochs: [_Result() for _ in jobs])

    def call(i: int) -> str:
        def encode(weights):
            if i == 1:
                raise ValueError("cannot encode")
            return weights["w"]

        try:
            return cohort.train(START, "job", None, epochs=1, model_of=lambda arrays: None,  # type: ignore[arg-type]
                                encode=encode)[1]
        except ValueError as error:
            return str(error)

    assert cohort.run_together([lambda i=i: call(i) for i in range(3)]) == ["trained", "cannot encode", "trained"]
