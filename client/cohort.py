"""Where a ClientApp call's local training runs: alone, or with the rest of its cohort.

A deployed client trains on its own (`train_clients` with one client). The in-process engine
instead runs a cohort of ClientApp calls, each in its own thread, through `run_together`: every
call goes through the whole ClientApp (mods, ledger, budget check, reply), and when it reaches
its training it hands the job over and waits; once every call of the cohort is waiting or done,
all the handed-over jobs train as one batch and each call carries on with its own result. The
ClientApp's code is the same in both cases, and so is its result (`client.training` gives every
client its own generators), within float tolerance.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from flwr.app import ArrayRecord

from client.training import ClientJob, TrainResult, train_clients
from common.config import Config

Result = TypeVar("Result")

_local = threading.local()  # the cohort a ClientApp call's thread belongs to


Encode = Callable[[dict[str, torch.Tensor]], ArrayRecord]


def train(start: ArrayRecord, job: ClientJob, cfg: Config, *, epochs: int,
          model_of: Callable[[ArrayRecord], torch.nn.Module], encode: Encode) -> tuple[TrainResult, ArrayRecord]:
    """Train one client from the weights `start`; `model_of` builds the model they load into and
    `encode` turns the trained weights into the reply's arrays. In a cohort both run on the serving
    thread, one batch after another: encoding in the calls' own threads made them contend for
    the GIL, which cost 4× the encoding itself (1,000 Beauty clients: 1.2 against 0.3 ms each)."""
    cohort: _Cohort | None = getattr(_local, "cohort", None)
    if cohort is None:
        result = train_clients(model_of(start), [job], cfg, epochs=epochs)[0]
        return result, encode(result.weights)
    return cohort.submit(_Request(start, job, cfg, epochs, model_of, encode))


def run_together(calls: Sequence[Callable[[], Result]]) -> list[Result]:
    """Run every call in a thread of its own and their local trainings as one batch; the calls'
    results, in order. A call must not raise (the grid turns ClientApp errors into replies)."""
    if len(calls) <= 1:
        return [call() for call in calls]
    cohort = _Cohort(len(calls))
    results: list[Result | None] = [None] * len(calls)

    def work(i: int) -> None:
        _local.cohort = cohort
        try:
            results[i] = calls[i]()
        finally:
            cohort.finished()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(calls))]
    for started, thread in enumerate(threads, start=1):
        thread.start()
        cohort.settled(started)
    cohort.serve()
    for thread in threads:
        thread.join()
    return results  # type: ignore[return-value]


@dataclasses.dataclass
class _Request:
    start: ArrayRecord
    job: ClientJob
    cfg: Config
    epochs: int
    model_of: Callable[[ArrayRecord], torch.nn.Module]
    encode: Encode
    result: tuple[TrainResult, ArrayRecord] | None = None
    error: BaseException | None = None
    answered: threading.Event = dataclasses.field(default_factory=threading.Event)

    def batch_key(self) -> tuple:
        """Requests that train together: the same settings and the same starting weights. The
        grid hands every call of a round the same arrays (their bytes are shared, not copied),
        so identity is the cheap test; equal weights that are not shared only train apart."""
        return (self.cfg, self.epochs, tuple((k, id(a.data)) for k, a in self.start.items()))


class _Cohort:
    """The serving thread alone waits on `condition`; each call waits on its own request's event.
    Calls run one at a time: each is started, or handed its result, only once the one before has
    finished or handed over its next training. Their work is Python (records, mods, replies) and
    holds the GIL anyway; run at once, 128 threads contending for it took 4× as long."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.done = 0
        self.waiting: list[_Request] = []
        self.condition = threading.Condition()

    def submit(self, request: _Request) -> tuple[TrainResult, ArrayRecord]:
        with self.condition:
            self.waiting.append(request)
            self.condition.notify()
        request.answered.wait()
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    def finished(self) -> None:
        with self.condition:
            self.done += 1
            self.condition.notify()

    def settled(self, count: int) -> None:
        """Wait until `count` calls are done or waiting for a training."""
        with self.condition:
            self.condition.wait_for(lambda: self.done + len(self.waiting) >= count)

    def serve(self) -> None:
        """Train whatever the calls hand over once none of them can go on; until all are done."""
        while True:
            self.settled(self.size)
            with self.condition:
                if not self.waiting:
                    return
                batch, self.waiting = self.waiting, []
            self._train(batch)
            settled = self.size - len(batch)
            for request in batch:  # an answered call runs until it is done or waits anew
                request.answered.set()
                settled += 1
                self.settled(settled)

    @staticmethod
    def _train(batch: list[_Request]) -> None:
        groups: dict[tuple, list[_Request]] = {}
        for request in batch:
            groups.setdefault(request.batch_key(), []).append(request)
        for requests in groups.values():
            first = requests[0]
            try:
                results = train_clients(first.model_of(first.start), [r.job for r in requests], first.cfg,
                                        epochs=first.epochs)
            except Exception as error:  # each call reports it as its ClientApp error
                for request in requests:
                    request.error = error
                continue
            for request, result in zip(requests, results, strict=True):
                try:
                    request.result = result, request.encode(result.weights)
                except Exception as error:
                    request.error = error
