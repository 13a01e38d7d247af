"""The fedrec ClientApp, driven the way Flower drives it: train/evaluate Messages in, replies out.

Messages are built as Flower's FedAvg builds them (a RecordDict with the global "arrays" and a
"config" holding "server-round") and delivered through `InProcessGrid` (copy of the message,
Context.state kept per node) or, for the restart test, by calling the app with a Context of our
own. Tiny synthetic data: 40 users over 4 clients, 10 windows each (2 DP steps per epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from recipes import LOCAL_DP

from client.client_app import app
from client.local import LEDGER
from common.config import Config, ConfigError
from common.dataset import eval_examples
from common.federation import client_data, federation
from common.flower_compat import server_task_identity, set_message_id
from common.metrics import LIST_METRICS, evaluate_model
from common.model import build_model
from common.privacy import Ledger, Mechanism, batches_per_epoch
from server.strategy import make_strategy
from simulation.grid import InProcessGrid, default_node_config

TINY: dict[str, Any] = {
    **LOCAL_DP,
    "synthetic-users": 40, "synthetic-items": 30, "synthetic-groups": 3, "synthetic-min-len": 8,
    "synthetic-max-len": 14, "max-len": 12, "embedding-dim": 8, "hidden-dim": 8, "batch-size": 8,
    "partition": "iid", "num-clients": 4, "local-epochs": 1, "num-server-rounds": 10, "lr": 0.003,
}
# An explicit σ skips the noise search (slow); the budget is large enough for every round here.
DP: dict[str, Any] = {**TINY, "noise-multiplier": 1.0, "target-epsilon": 50.0}
RUN_ID = 1


def initial_arrays(run_config: dict[str, Any]) -> ArrayRecord:
    cfg = Config.from_run_config(run_config)
    torch.manual_seed(0)
    return ArrayRecord(build_model(cfg, federation(cfg).data.num_items).state_dict())


def instruction(node_id: int, kind: str, arrays: ArrayRecord, server_round: int) -> Message:
    """A message as FedAvg sends it, from the SuperLink's ServerApp task."""
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    with server_task_identity(RUN_ID):
        return Message(content, node_id, kind)


def send(grid: InProcessGrid, partition: int, kind: str, arrays: ArrayRecord, server_round: int = 1) -> Message:
    with server_task_identity(RUN_ID):
        replies = list(grid.send_and_receive([instruction(grid.node_id_of(partition), kind, arrays, server_round)]))
    assert len(replies) == 1
    return replies[0]


def call(context: Context, kind: str, arrays: ArrayRecord, server_round: int) -> Message:
    """What a SuperNode does: hand the ClientApp a message and the node's Context."""
    message = instruction(context.node_id, kind, arrays, server_round)
    set_message_id(message, str(uuid4()))
    with server_task_identity(RUN_ID):
        return app(message=message, context=context)


def ledger_of(state: RecordDict) -> Ledger:
    return Ledger.from_json(str(state.config_records[LEDGER]["ledger"]))


def pld_epsilon(history: tuple[Mechanism, ...], delta: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """On a busy 2-core machine torch's thread pool makes these tiny steps ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dp_run(one_torch_thread: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three DP rounds of partition 0 with one Context (the grid keeps its state)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREC_CACHE", str(tmp_path_factory.mktemp("cache")))
        grid = InProcessGrid(app, 4, DP)
        arrays = initial_arrays(DP)
        replies, ledgers = [], []
        current = arrays
        for server_round in (1, 2, 3):
            reply = send(grid, 0, MessageType.TRAIN, current, server_round)
            assert not reply.has_error(), reply.error
            replies.append(reply)
            ledgers.append(ledger_of(grid.node_states[grid.node_id_of(0)]))
            current = reply.content["arrays"]  # as FedAvg with a single client would
        yield {"grid": grid, "initial": arrays, "replies": replies, "ledgers": ledgers}


def test_dp_train_reply(dp_run):
    cfg = Config.from_run_config(DP)
    initial, reply = dp_run["initial"], dp_run["replies"][0]
    assert reply.metadata.src_node_id == dp_run["grid"].node_id_of(0)
    assert reply.metadata.message_type == MessageType.TRAIN
    arrays = reply.content["arrays"]
    assert list(arrays.keys()) == list(initial.keys())
    for key, ref in initial.items():
        assert arrays[key].shape == ref.shape and arrays[key].dtype == ref.dtype
        assert np.isfinite(arrays[key].numpy()).all()
    assert any(not np.array_equal(arrays[k].numpy(), initial[k].numpy()) for k in initial.keys())  # it trained

    metrics = reply.content["metrics"]
    assert set(metrics) == {"num-examples", "train-loss", "epsilon", "declined", "unit-weight", "dp-units"}
    assert metrics["num-examples"] == len(client_data(cfg, 0).windows) > 0
    assert metrics["dp-units"] == client_data(cfg, 0).dp_population(cfg) > 0
    assert metrics["declined"] == 0
    assert np.isfinite(metrics["train-loss"]) and metrics["train-loss"] > 0
    assert metrics["epsilon"] > 0


def test_epsilon_grows_over_rounds_and_matches_the_stored_ledger(dp_run):
    cfg = Config.from_run_config(DP)
    batches = batches_per_epoch(client_data(cfg, 0).dp_population(cfg), cfg.batch_size)
    epsilons = [float(r.content["metrics"]["epsilon"]) for r in dp_run["replies"]]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] < cfg.target_epsilon
    for server_round, (eps, ledger) in enumerate(zip(epsilons, dp_run["ledgers"], strict=True), start=1):
        assert eps == pytest.approx(Ledger(ledger.history).epsilon(cfg.delta), rel=1e-9)
        # the ledger holds what ran: σ as configured, q = 1 / batches, every step of every round
        assert {(s, q) for s, q, _ in ledger.history} == {(cfg.noise_multiplier, 1 / batches)}
        assert sum(n for _, _, n in ledger.history) == server_round * cfg.local_epochs * batches
    # and an independent accountant agrees with what the client reported
    final = dp_run["ledgers"][-1]
    assert epsilons[-1] == pytest.approx(pld_epsilon(final.history, cfg.delta), rel=0.03)


def test_restarted_client_resumes_its_spent_budget(dp_run, tmp_path: Path):
    state_dir = tmp_path / "node-0"
    node_config = {"partition-id": 0, "num-partitions": 4, "state-dir": str(state_dir)}

    def fresh_context() -> Context:  # a SuperNode (re)started: empty state, same state folder
        return Context(run_id=RUN_ID, node_id=dp_run["grid"].node_id_of(0), node_config=dict(node_config),
                       state=RecordDict(), run_config=dict(DP))

    first = fresh_context()
    round1 = call(first, MessageType.TRAIN, dp_run["initial"], 1)
    assert (state_dir / f"{LEDGER}.json").is_file()
    assert LEDGER not in first.state.config_records  # with a state-dir, the file is the ledger
    # the same seed, round and partition train the same weights (runs reproduce)
    for key, ref in dp_run["replies"][0].content["arrays"].items():
        np.testing.assert_allclose(round1.content["arrays"][key].numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)

    restarted = fresh_context()
    round2 = call(restarted, MessageType.TRAIN, round1.content["arrays"], 2)
    eps1, eps2 = (float(r.content["metrics"]["epsilon"]) for r in (round1, round2))
    no_restart = [float(r.content["metrics"]["epsilon"]) for r in dp_run["replies"][:2]]
    assert eps1 == pytest.approx(no_restart[0], rel=1e-9)
    assert eps2 == pytest.approx(no_restart[1], rel=1e-9)
    assert eps2 > eps1
    cfg = Config.from_run_config(DP)
    assert Ledger.load(state_dir / f"{LEDGER}.json").epsilon(cfg.delta) == pytest.approx(eps2, rel=1e-9)


def test_tampered_ledger_file_fails_the_round_instead_of_forgetting(tmp_path: Path):
    state_dir = tmp_path / "node-1"
    Ledger(((1.0, 0.5, 40),)).save(state_dir / f"{LEDGER}.json")
    path = state_dir / f"{LEDGER}.json"
    path.write_text(path.read_text().replace("[[1.0, 0.5, 40]]", "[[1.0, 0.5, 4]]"))
    grid = InProcessGrid(app, 4, DP, lambda i: {**default_node_config(4)(i), "state-dir": str(state_dir)})
    reply = send(grid, 1, MessageType.TRAIN, initial_arrays(DP))
    assert reply.has_error()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "checksum" in (reply.error.reason or "")


def test_client_declines_a_round_that_would_pass_its_budget():
    sigma = 0.8
    cfg0 = Config.from_run_config(TINY)
    batches = batches_per_epoch(len(client_data(cfg0, 2).windows), cfg0.batch_size)
    one_round = Ledger(((sigma, 1 / batches, batches),)).epsilon(cfg0.delta)
    run_config = {**TINY, "noise-multiplier": sigma, "target-epsilon": one_round * 1.02}
    grid = InProcessGrid(app, 4, run_config)
    arrays = initial_arrays(run_config)
    state = lambda: grid.node_states[grid.node_id_of(2)]  # noqa: E731

    trained = send(grid, 2, MessageType.TRAIN, arrays, 1)
    assert not trained.has_error(), trained.error
    assert trained.content["metrics"]["declined"] == 0
    assert trained.content["metrics"]["epsilon"] == pytest.approx(one_round, rel=1e-6)
    spent = ledger_of(state())

    declined = send(grid, 2, MessageType.TRAIN, trained.content["arrays"], 2)
    assert not declined.has_error(), declined.error
    metrics = declined.content["metrics"]
    assert metrics["declined"] == 1
    assert metrics["num-examples"] == 0
    assert metrics["epsilon"] == pytest.approx(one_round, rel=1e-6)  # what it has spent, not more
    assert "arrays" not in declined.content and not declined.content.array_records
    reason = str(declined.content["config"]["reason"])
    assert "privacy budget" in reason and f"{run_config['target-epsilon']:g}" in reason
    assert ledger_of(state()) == spent  # declining spends nothing


def test_without_dp_epsilon_is_zero_and_no_ledger_is_written(tmp_path: Path):
    run_config = {**TINY, "dp": False}
    state_dir = tmp_path / "node-1"

    def node_config(i: int) -> dict[str, Any]:  # node 1 has a state folder, node 0 does not
        return {**default_node_config(4)(i), **({"state-dir": str(state_dir)} if i == 1 else {})}

    grid = InProcessGrid(app, 4, run_config, node_config)
    arrays = initial_arrays(run_config)
    for partition in (0, 1):
        reply = send(grid, partition, MessageType.TRAIN, arrays)
        assert not reply.has_error(), reply.error
        metrics = reply.content["metrics"]
        assert metrics["epsilon"] == 0.0 and metrics["declined"] == 0
        assert metrics["num-examples"] > 0
        assert list(reply.content["arrays"].keys()) == list(arrays.keys())
        assert LEDGER not in grid.node_states[grid.node_id_of(partition)].config_records
    assert not state_dir.exists() or not any(state_dir.iterdir())


def test_evaluate_reports_ranking_metrics_over_the_clients_users():
    cfg = Config.from_run_config(DP)
    grid = InProcessGrid(app, 4, DP)
    arrays = initial_arrays(DP)
    for partition in range(4):
        reply = send(grid, partition, MessageType.EVALUATE, arrays)
        assert not reply.has_error(), reply.error
        metrics = reply.content["metrics"]
        assert 0 <= metrics["ndcg@10"] <= metrics["hr@10"] <= 1
        assert metrics["num-examples"] == len(federation(cfg).clients[partition]) > 0
        assert not any(k.startswith("coverage") for k in metrics)
        assert "arrays" not in reply.content
        # evaluation spends no privacy budget
        assert LEDGER not in grid.node_states[grid.node_id_of(partition)].config_records


def test_clients_evaluations_averaged_by_the_strategy_equal_one_evaluation_of_all_their_users():
    """What the server reports as federated metrics (Flower's user-weighted mean of the clients'
    replies) is the evaluation of every client's users at once; the list metrics, which a mean
    would understate, are left out."""
    run_config = {**DP, "num-clients": 3}  # 14, 13 and 13 users: the weights matter
    cfg = Config.from_run_config(run_config)
    grid = InProcessGrid(app, 3, run_config)
    arrays = initial_arrays(run_config)
    replies = [send(grid, partition, MessageType.EVALUATE, arrays) for partition in range(3)]
    federated = make_strategy(cfg, 3).aggregate_evaluate(1, replies)
    fed = federation(cfg)
    model = build_model(cfg, fed.data.num_items)
    model.load_state_dict(arrays.to_torch_state_dict())
    users = fed.data.sequences.subset(np.concatenate(fed.clients))
    pooled = evaluate_model(model, *eval_examples(users, "valid", cfg.max_len), fed.data.num_items, ks=(10,))
    expected = {k: v for k, v in pooled.items() if k != "users" and not k.startswith(LIST_METRICS)}
    assert {k: federated[k] for k in expected} == pytest.approx(expected, rel=1e-9)
    unweighted = np.mean([r.content["metrics"]["hr@10"] for r in replies])
    assert unweighted != pytest.approx(expected["hr@10"], rel=1e-9)  # so the test sees the weighting
    assert not any(k.startswith(LIST_METRICS) for k in federated)


def test_derived_noise_is_sized_for_all_planned_rounds(monkeypatch: pytest.MonkeyPatch):
    """With noise-multiplier 0 the client asks for the σ of num-server-rounds x local-epochs
    epochs on its windows and trains with it. (Opacus's σ search itself takes ~7 s; it is
    stubbed here and tested in test_training.py.)"""
    import client.local as client_local

    asked = []

    def fake_noise_multiplier_for(cfg: Config, num_windows: int, epochs: int) -> float:
        asked.append((cfg.target_epsilon, num_windows, epochs))
        return 1.25

    monkeypatch.setattr(client_local, "noise_multiplier_for", fake_noise_multiplier_for)
    run_config = {**TINY, "num-server-rounds": 5, "local-epochs": 2, "target-epsilon": 8.0}
    cfg = Config.from_run_config(run_config)
    assert cfg.dp and cfg.noise_multiplier == 0
    grid = InProcessGrid(app, 4, run_config)
    reply = send(grid, 3, MessageType.TRAIN, initial_arrays(run_config))
    assert not reply.has_error(), reply.error
    windows = len(client_data(cfg, 3).windows)
    assert asked == [(8.0, windows, 5 * 2)]
    batches = batches_per_epoch(windows, cfg.batch_size)
    ledger = ledger_of(grid.node_states[grid.node_id_of(3)])
    assert ledger.history == ((1.25, 1 / batches, 2 * batches),)
    assert reply.content["metrics"]["epsilon"] == pytest.approx(ledger.epsilon(cfg.delta), rel=1e-9)


def test_fixed_noise_without_a_budget_is_refused():
    """With DP on, a fixed σ still needs a budget to keep to: the config is refused up front, and a
    ClientApp handed it anyway (a node given a bad run config) fails the round and spends nothing."""
    run_config = {**TINY, "noise-multiplier": 1.0, "target-epsilon": 0.0}
    with pytest.raises(ConfigError, match="target-epsilon must be > 0"):
        Config.from_run_config(run_config)
    grid = InProcessGrid(app, 4, run_config)
    reply = send(grid, 0, MessageType.TRAIN, initial_arrays(TINY))
    assert reply.has_error()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "target-epsilon must be > 0" in (reply.error.reason or "")
    assert LEDGER not in grid.node_states[grid.node_id_of(0)].config_records
