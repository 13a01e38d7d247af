"""User-level central DP (Flower's client-side clipping, fedrec's accounting) and the privacy report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.config import Config, ConfigError
from common.privacy import Ledger, independent_epsilon
from server import central_dp
from server.privacy_report import audit_run
from simulation.run import simulate

SMALL = {"synthetic-users": 90, "synthetic-items": 30, "synthetic-groups": 3, "synthetic-min-len": 8,
         "synthetic-max-len": 14, "max-len": 10, "embedding-dim": 8, "hidden-dim": 8, "batch-size": 16,
         "partition": "iid", "num-clients": 3, "fraction-train": 1.0, "local-epochs": 1, "num-server-rounds": 2}


def test_central_dp_clips_every_update_on_the_device(tmp_path):
    """With a tiny clipping norm and little noise (σ·C/3 per weight, ~1k weights: ~0.1 C in all),
    round 1 moves the model by about C at most; unclipped, the updates are ~100x larger."""
    clip = 1e-3
    cfg = Config.from_run_config({**SMALL, "dp": False, "central-dp": True, "central-clip": clip,
                                  "central-noise-multiplier": 0.01, "num-server-rounds": 1, "out-dir": str(tmp_path / "c")})
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


def test_central_dp_refuses_fedadam():
    with pytest.raises(ConfigError, match="fedavg"):
        Config.from_run_config({"central-dp": True, "server-strategy": "fedadam"})


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


def test_report_catches_tampered_ledgers(both_dp_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(both_dp_run, run)
    first, second = sorted((run / "ledgers").glob("*.json"))[:2]
    # Edited by hand: the checksum no longer matches.
    data = json.loads(first.read_text())
    data["history"][0][2] = 1
    first.write_text(json.dumps(data))
    # Edited with a fresh checksum: it no longer matches the ε its client reported.
    halved = Ledger(tuple((s, q, max(n // 2, 1)) for s, q, n in Ledger.from_json(second.read_text()).history))
    second.write_text(halved.to_json())
    clients, _ = audit_run(run)
    problems = {c.name: c.problem for c in clients}
    assert "checksum" in problems[f"client {first.stem}"]
    assert "does not match" in problems[f"client {second.stem}"]
    assert sum(1 for p in problems.values() if p) == 2
    assert np.isfinite([c.prv for c in clients if c.prv is not None]).all()


def test_privacy_command_exits_non_zero_on_a_tampered_ledger(both_dp_run, tmp_path, monkeypatch, capsys):
    import shutil
    import sys

    from fedrec.cli import main

    def fedrec(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["fedrec", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
            raise SystemExit(0)
        return exit_info.value.code or 0

    assert fedrec("privacy", "--run", str(both_dp_run)) == 0
    assert "all 4 ledgers agree" in capsys.readouterr().out
    run = tmp_path / "copy"
    shutil.copytree(both_dp_run, run)
    victim = sorted((run / "ledgers").glob("*.json"))[0]
    victim.write_text(Ledger(((50.0, 0.5, 1),)).to_json())  # a plausible, re-checksummed, much smaller spend
    assert fedrec("privacy", "--run", str(run)) == 1
    assert "does not match" in capsys.readouterr().err
