"""User-level central DP (Flower's client-side clipping, fedrec's accounting) and the privacy report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from recipes import LOCAL_DP

from common.config import Config, ConfigError
from common.errors import DataError
from common.privacy import Ledger, independent_epsilon
from server import central_dp
from server.privacy_report import audit_run
from simulation.run import simulate

SMALL = {**LOCAL_DP, "synthetic-users": 90, "synthetic-items": 30, "synthetic-groups": 3, "synthetic-min-len": 8,
         "synthetic-max-len": 14, "max-len": 10, "embedding-dim": 8, "hidden-dim": 8, "batch-size": 16,
         "partition": "iid", "num-clients": 3, "fraction-train": 1.0, "local-epochs": 1, "num-server-rounds": 2}


def test_central_dp_clips_every_update_on_the_device(tmp_path):
    """With a tiny clipping norm and little noise (σ·C/3 per weight, ~1k weights: ~0.1 C in all),
    round 1 moves the model by about C at most; unclipped, the updates are ~100x larger."""
    clip = 1e-3
    cfg = Config.from_run_config({**SMALL, "dp": False, "central-dp": True, "central-clip": clip,
                                  "central-noise-multiplier": 0.01, "num-server-rounds": 1,
                                  "out-dir": str(tmp_path / "c")})
    torch.manual_seed(cfg.seed)
    from common.model import build_model
    start = build_model(cfg, 30).state_dict()
    simulate(cfg, quiet=True)
    end = torch.load(tmp_path / "c" / "model.pt", weights_only=True)
    moved = float(torch.sqrt(sum(((end[k] - start[k]) ** 2).sum() for k in start)))
    assert 0 < moved <= clip * 1.3


def test_central_guarantee_is_accounted_over_rounds_and_sampling(tmp_path):
    cfg = Config.from_run_config({**SMALL, "dp": False, "central-dp": True, "central-target-epsilon": 4.0,
                                  "num-clients": 3, "fraction-train": 0.67, "min-train-nodes": 2,
                                  "num-server-rounds": 3, "out-dir": str(tmp_path / "c")})
    summary = simulate(cfg, quiet=True)
    c = summary["central_dp"]
    assert c["enabled"] and c["sample_rate"] == pytest.approx(2 / 3) and c["rounds"] == 3
    assert 3.8 <= c["epsilon"] <= 4.0 + 1e-6  # σ was chosen for this target
    assert c["epsilon"] == pytest.approx(independent_epsilon(((c["noise_multiplier"], 2 / 3, 3),), 1e-5), rel=0.05)
    assert "all of one client's data" in c["unit"] and summary["dp"] == {"enabled": False}
    assert central_dp.sampled_per_round(cfg, 3) == 2


def test_the_server_optimizer_steps_after_the_central_noise():
    """FedAdam under central DP steps on the noised average: its first step moves every weight by
    about 0.74 η whatever the noise (Adam's m / sqrt(v) is ±1), and the noise decides the signs. Had the
    noise come after the step, as Flower's wrapper around FedAdam would add it, the weights would
    move by about σ·C/m = 33 instead."""
    from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from common.replies import TrainMetrics
    from server.strategy import GuardedStrategy, make_strategy
    from simulation.grid import InProcessGrid, run_server_app

    clients, eta = 3, 1e-3
    cfg = Config.from_run_config({**LOCAL_DP, "dp": False, "central-dp": True, "server-strategy": "fedadam",
                                  "server-lr": eta,
                                  "central-noise-multiplier": 100.0, "central-clip": 1.0, "fraction-train": 1.0,
                                  "min-train-nodes": 1, "fraction-evaluate": 0.0})
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:  # every client moves every weight by +1
        arrays = ArrayRecord({"w": Array(msg.content["arrays"]["w"].numpy() + 1.0)})
        metrics = TrainMetrics(num_examples=1, train_loss=0.0, epsilon=0.0).to_record()
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    strategy = GuardedStrategy(make_strategy(cfg, clients), seed=0, min_train_nodes=1)
    result = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        result["w"] = strategy.start(grid=grid, initial_arrays=ArrayRecord({"w": Array(np.zeros(400))}),
                                     num_rounds=1).arrays["w"].numpy()

    run_server_app(server, InProcessGrid(client, clients, {}))
    step = result["w"]
    first = eta * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # Flower's bias-corrected first step (β1 0.9, β2 0.99)
    assert np.abs(step).max() <= 1.01 * first and np.median(np.abs(step)) > 0
    assert 0.3 < (step < 0).mean() < 0.7  # the noise (std 33 against a mean update of 1) chose the signs
    # Adam's τ sits at the noise std of the average (σC/m), so noise alone takes smaller steps
    assert strategy.inner.tau == pytest.approx(central_dp.TAU_NOISE_FLOOR * 100.0 * 1.0 / clients)
    assert np.median(np.abs(step)) < 0.2 * first
    assert set(strategy.inner.m_t) == {"w"}  # Adam's moments exist for the checkpoint


def test_central_dp_with_a_server_optimizer_runs_end_to_end_at_the_same_epsilon(tmp_path):
    summaries = {}
    for strategy in ("fedavg", "fedadam"):
        cfg = Config.from_run_config({**SMALL, "dp": False, "central-dp": True, "central-target-epsilon": 4.0,
                                      "server-strategy": strategy, "server-lr": 0.01,
                                      "out-dir": str(tmp_path / strategy)})
        summaries[strategy] = simulate(cfg, quiet=True)
    assert summaries["fedadam"]["central_dp"] == summaries["fedavg"]["central_dp"]  # post-processing: free
    saved = torch.load(tmp_path / "fedadam" / "checkpoint.pt", weights_only=True)
    assert set(saved["optimizer"]) == {"m_t", "v_t"}


@pytest.fixture(scope="module")
def both_dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "both"
    cfg = Config.from_run_config({**SMALL, "dp": True, "target-epsilon": 6.0, "central-dp": True, "out-dir": str(out)})
    simulate(cfg, quiet=True)
    return out


def test_report_recomputes_every_epsilon_and_they_agree(both_dp_run):
    clients, central = audit_run(both_dp_run)
    assert len(clients) == 3 and central is not None
    for check in [*clients, central]:
        assert check.problem == "" and check.prv == pytest.approx(check.pld, rel=0.05)
        assert check.reported == pytest.approx(check.prv, rel=1e-6)
    assert all(0 < c.prv <= 6.0 for c in clients)


def _copy(run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


def _problems(run) -> dict[str, str]:
    clients, _ = audit_run(run)
    return {c.name: c.problem for c in clients}


def test_report_catches_tampered_ledgers(both_dp_run, tmp_path):
    run = _copy(both_dp_run, tmp_path)
    first, second = sorted((run / "ledgers").glob("*.json"))[:2]
    # Edited by hand: the checksum no longer matches.
    data = json.loads(first.read_text())
    data["history"][0][2] = 1
    first.write_text(json.dumps(data))
    # Edited with a fresh checksum: it no longer matches the server's record.
    halved = Ledger(tuple((s, q, max(n // 2, 1)) for s, q, n in Ledger.from_json(second.read_text()).history))
    second.write_text(halved.to_json())
    problems = _problems(run)
    assert "checksum" in problems[f"client {first.stem}"]
    assert "participation record" in problems[f"client {second.stem}"]
    assert sum(1 for p in problems.values() if p) == 2
    clients, _ = audit_run(run)
    assert np.isfinite([c.prv for c in clients if c.prv is not None]).all()


def test_report_catches_a_consistently_edited_ledger(both_dp_run, tmp_path):
    """Steps removed, checksum recomputed and privacy.json edited to match: only the server's own
    participation record still knows what the client spent."""
    run = _copy(both_dp_run, tmp_path)
    victim = sorted((run / "ledgers").glob("*.json"))[0]
    shorter = Ledger(tuple((s, q, max(n // 2, 1)) for s, q, n in Ledger.from_json(victim.read_text()).history))
    victim.write_text(shorter.to_json())
    privacy = json.loads((run / "privacy.json").read_text())
    privacy["reported_epsilon"][victim.stem] = shorter.epsilon(privacy["delta"])
    (run / "privacy.json").write_text(json.dumps(privacy))
    problems = _problems(run)
    assert "participation record" in problems[f"client {victim.stem}"]
    assert "does not match the record" in problems[f"client {victim.stem}"]
    assert sum(1 for p in problems.values() if p) == 1


def test_report_catches_missing_evidence(both_dp_run, tmp_path):
    import shutil

    run = _copy(both_dp_run, tmp_path)
    names = sorted(p.stem for p in (run / "ledgers").glob("*.json"))
    (run / "ledgers" / f"{names[0]}.json").unlink()
    privacy = json.loads((run / "privacy.json").read_text())
    del privacy["reported_epsilon"][names[1]]
    (run / "privacy.json").write_text(json.dumps(privacy))
    problems = _problems(run)
    assert problems[f"client {names[0]}"] == "ledger missing"
    assert problems[f"client {names[1]}"] == "no reported ε in privacy.json"
    assert problems[f"client {names[2]}"] == ""
    shutil.rmtree(run / "ledgers")
    assert set(_problems(run).values()) >= {"ledger missing"} and all(_problems(run).values())
    (run / "participation.json").unlink()
    with pytest.raises(DataError, match="participation.json not found"):
        audit_run(run)


def test_report_catches_a_ledger_reset_in_the_checkpoint(tmp_path, interrupted_run):
    """A client's ledger deleted from checkpoint.pt before --resume restarts it at ε = 0: the
    resumed run finishes, and the audit, reading the server's record, fails that client."""
    from server import checkpoint

    settings = {**SMALL, "dp": True, "target-epsilon": 6.0, "num-server-rounds": 2, "min-train-nodes": 1}
    out = tmp_path / "cut"
    interrupted_run(Config.from_run_config({**settings, "out-dir": str(out)}), after=1)
    saved = torch.load(out / checkpoint.CHECKPOINT, weights_only=True)
    clients = json.loads(saved["clients"])
    victim = sorted(node for node, records in clients.items() if "privacy-ledger" in records)[0]
    del clients[victim]["privacy-ledger"]
    saved["clients"] = json.dumps(clients)
    torch.save(saved, out / checkpoint.CHECKPOINT)
    simulate(Config.from_run_config({**settings, "out-dir": str(out), "resume": True}), quiet=True)
    problems = _problems(out)
    assert "participation record" in problems[f"client {victim}"]
    assert sum(1 for p in problems.values() if p) == 1


def test_privacy_command_exits_non_zero_on_a_tampered_ledger(both_dp_run, tmp_path, monkeypatch, capsys):
    import sys

    from fedrec.cli import main

    def fedrec(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["fedrec", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
            raise SystemExit(0)
        return exit_info.value.code or 0

    assert fedrec("privacy", "--run", str(both_dp_run)) == 0
    assert "all 3 clients' ledgers and reported ε match the server's participation record" in capsys.readouterr().out
    run = _copy(both_dp_run, tmp_path)
    victim = sorted((run / "ledgers").glob("*.json"))[0]
    victim.write_text(Ledger(((50.0, 0.5, 1),)).to_json())  # a plausible, re-checksummed, much smaller spend
    assert fedrec("privacy", "--run", str(run)) == 1
    assert "participation record" in capsys.readouterr().err


@pytest.mark.parametrize("start, moves", [(100.0, "down"), (1e-6, "up")])
def test_adaptive_clipping_moves_the_norm_towards_the_quantile_at_the_same_epsilon(tmp_path, start, moves):
    """Flower's adaptive clipping (Andrew et al.) with fedrec's clients: a norm far above every
    update shrinks, one far below grows; the guarantee is accounted for the same σ as fixed
    clipping, and the norm reached is in the checkpoint, so a resumed run carries on from it."""
    settings = {**SMALL, "dp": False, "central-dp": True, "central-noise-multiplier": 0.1, "num-server-rounds": 3,
                "central-clip": start, "central-clip-quantile": 0.5}
    adaptive = simulate(Config.from_run_config({**settings, "out-dir": str(tmp_path / "a")}), quiet=True)
    fixed = simulate(Config.from_run_config({**settings, "central-clip-quantile": 0.0,
                                             "out-dir": str(tmp_path / "f")}), quiet=True)
    assert adaptive["central_dp"]["epsilon"] == fixed["central_dp"]["epsilon"]
    assert adaptive["central_dp"]["clipping"].startswith("adaptive") and fixed["central_dp"]["clipping"] == "fixed"
    reached = json.loads(torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["clipping_norm"])
    # three rounds at learning rate 0.2 and a clipped fraction of about 0 or 1: a factor near exp(±0.3)
    assert (reached < 0.85 * start) if moves == "down" else (reached > 1.15 * start)
    assert json.loads(torch.load(tmp_path / "f" / "checkpoint.pt", weights_only=True)["clipping_norm"]) is None


def test_adaptive_clipping_that_cannot_reach_the_noise_is_refused(tmp_path):
    cfg = Config.from_run_config({**SMALL, "dp": False, "central-dp": True, "central-noise-multiplier": 1.0,
                                  "central-clip-quantile": 0.5, "out-dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="adaptive clipping cannot reach central noise multiplier 1 with 3 clients"):
        simulate(cfg, quiet=True)
    assert not (tmp_path / "run").exists()


def _one_round_delta(tmp_path, name: str, **settings) -> np.ndarray:
    """The weights after one round, minus the start, every weight in one vector."""
    cfg = Config.from_run_config({**SMALL, "dp": False, "central-dp": True, "secagg": True, "central-clip": 0.01,
                                  "min-train-nodes": 3, "num-server-rounds": 1, "fraction-evaluate": 0.0,
                                  "out-dir": str(tmp_path / name), **settings})
    torch.manual_seed(cfg.seed)
    from common.model import build_model
    start = build_model(cfg, 30).state_dict()
    simulate(cfg, quiet=True)
    end = torch.load(tmp_path / name / "model.pt", weights_only=True)
    return torch.cat([(end[k] - start[k]).flatten() for k in start]).numpy()


def test_distributed_dp_clients_add_the_noise_the_server_would_have(tmp_path):
    """Three clients each add N(0, (σC)²/3) under SecAgg+: the average's noise is σC/3 per weight,
    as central DP's, and the server adds none of its own (with it the std would be √2 larger)."""
    sigma, clip, low = 2.0, 0.01, 0.3  # `low`: the reference run's σ (the accountant needs one > 0)
    plain = _one_round_delta(tmp_path, "plain", **{"central-noise-multiplier": low})
    shared = _one_round_delta(tmp_path, "shared", **{"central-noise-multiplier": sigma, "distributed-dp": True})
    central = _one_round_delta(tmp_path, "central", **{"central-noise-multiplier": sigma})
    summary = json.loads((tmp_path / "shared" / "summary.json").read_text())
    expected = np.hypot(sigma, low) * clip / 3  # the two runs' noises are independent
    assert np.std(shared - plain) == pytest.approx(expected, rel=0.1)
    assert np.std(central - plain) == pytest.approx(expected, rel=0.1)
    assert summary["central_dp"]["noise"].startswith("distributed") and "server included" in \
        summary["central_dp"]["protects_against"]


@pytest.mark.parametrize("settings, message", [
    ({"secagg": False}, "distributed-dp needs central-dp and secagg on"),
    ({"central-clip-quantile": 0.5}, "fixed clipping"),
    ({"min-train-nodes": 1}, "distributed-dp needs min-train-nodes >= 2"),
])
def test_distributed_dp_needs_secagg_fixed_clipping_and_a_floor_of_survivors(settings, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_run_config({**SMALL, "dp": False, "central-dp": True, "secagg": True, "distributed-dp": True,
                                "min-train-nodes": 3, **settings})
