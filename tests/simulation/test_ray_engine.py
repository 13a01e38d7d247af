"""`run_on_ray` runs a Flower App on Flower's own Ray engine through `flwr run`, and cleans up.

The app is a toy written into ``tmp_path`` (not fedrec's apps, so these tests only depend on
Flower): the 'model' is one array of zeros; the ClientApp on partition ``i`` returns
``array + 1 + i`` with weight 1, so with 3 SuperNodes FedAvg adds 2 per round and 2 rounds end
at 4.0. Each app writes its ``run_config`` to ``out-dir`` so the overrides can be checked on
both sides. Each test starts Ray (~15-25 s on 2 busy cores).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from recipes import LOCAL_DP

from server.flower_cli import is_running
from simulation.ray_engine import RayRun, RayRunError, run_on_ray

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "toyapp"
version = "0.1.0"
description = "Toy Flower App for the Ray engine test"
license = "Apache-2.0"
dependencies = ["flwr[simulation]"]

[tool.flwr.app]
publisher = "fedrec"

[tool.flwr.app.components]
serverapp = "toy_server:app"
clientapp = "toy_client:app"

[tool.flwr.app.config]
num-server-rounds = 2
marker = "default"
fail = false
out-dir = ""
"""

SERVER = """\
import json
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = dict(context.run_config)
    Path(config["out-dir"], "server.json").write_text(json.dumps(config))
    if config["fail"]:
        raise ValueError("toy ServerApp failed on purpose")
    result = FedAvg(fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=ArrayRecord([np.zeros(3)]),
        num_rounds=int(config["num-server-rounds"]))
    log(INFO, "TOY final=%s", result.arrays.to_numpy_ndarrays()[0].tolist())
"""

CLIENT = """\
import json
from pathlib import Path

import ray
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    config = dict(context.run_config)
    config["ray-actor"] = ray.get_runtime_context().get_actor_id()  # None outside Ray actors
    Path(config["out-dir"], f"client-{partition}.json").write_text(json.dumps(config))
    array = msg.content["arrays"].to_numpy_ndarrays()[0] + 1.0 + partition
    content = RecordDict({"arrays": ArrayRecord([array]),
                          "metrics": MetricRecord({"num-examples": 1})})
    return Message(content, reply_to=msg)
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="process tracking reads /proc"),
]


def write_toy_app(root: Path) -> Path:
    app = root / "toyapp"
    app.mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "toy_server.py").write_text(SERVER)
    (app / "toy_client.py").write_text(CLIENT)
    return app


def assert_all_stopped(run: RayRun) -> None:
    # SuperLink, SuperExec, flwr-simulation, Ray's gcs_server, raylet, workers, ...
    assert len(run.pids) >= 3, run.pids
    assert [pid for pid in run.pids if is_running(pid)] == []


def test_failing_server_app_raises_although_flwr_run_exits_zero(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(RayRunError, match="finished:failed.*failed on purpose") as caught:
        run_on_ray(write_toy_app(tmp_path), num_supernodes=3,
                   run_config={"fail": True, "out-dir": str(out)}, timeout=300)

    assert isinstance(caught.value, RuntimeError)
    assert caught.value.run.status == "finished:failed"
    assert "ValueError: toy ServerApp failed on purpose" in caught.value.run.log
    assert_all_stopped(caught.value.run)


def test_unknown_run_config_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RayRunError, match="Invalid run configuration") as caught:
        run_on_ray(write_toy_app(tmp_path), num_supernodes=2,
                   run_config={"no-such-key": 1}, timeout=120)
    assert caught.value.run.run_id is None
    assert_all_stopped(caught.value.run)


@pytest.mark.slow
def test_fedrec_app_runs_two_rounds_on_ray(tmp_path: Path) -> None:
    """The same ServerApp and ClientApp that `fedrec simulate` runs in-process, on Flower's Ray engine."""
    out = tmp_path / "run"
    tiny = {**LOCAL_DP, "synthetic-users": 60, "synthetic-items": 30, "synthetic-groups": 3, "synthetic-min-len": 8,
            "synthetic-max-len": 14, "max-len": 12, "embedding-dim": 8, "hidden-dim": 8, "batch-size": 8,
            "partition": "iid", "num-clients": 3, "fraction-train": 1.0, "num-server-rounds": 2,
            "out-dir": str(out)}
    run = run_on_ray(Path(__file__).resolve().parents[2], num_supernodes=3, run_config=tiny, timeout=300)
    assert run.status == "finished:completed"
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[-1]["trained"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dp"]["enabled"] and summary["dp"]["clients_accounted"] == 3
    assert_all_stopped(run)
