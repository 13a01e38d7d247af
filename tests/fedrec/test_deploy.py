"""Deployment end to end on loopback: certificates, a TLS SuperLink with SuperNode authentication,
three warm SuperNodes each with its own data file, two DP rounds through `fedrec run`, then a
round with SecAgg+ against the same round without; an unregistered and a plain-text SuperNode are
refused; every process started is stopped by PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import Config
from common.federation import write_device_files
from common.privacy import Ledger
from server import flower_cli as fc

FEDREC = [sys.executable, "-m", "fedrec"]
DATA = {"dataset": "synthetic", "synthetic-users": 240, "synthetic-items": 40, "synthetic-groups": 4,
        "synthetic-min-len": 8, "synthetic-max-len": 16, "holdout-users": 0.25}
COMMON = ("min-train-nodes=3 fraction-train=1.0 local-epochs=1 max-len=10 "
          "embedding-dim=16 hidden-dim=16 batch-size=16 central-dp=false server-strategy=\"fedavg\"")
TRAINING = COMMON + " fraction-evaluate=1.0 dp=true target-epsilon=8"
# SecAgg+ against the same round without it (no DP: the devices' budgets stay the first run's; no
# evaluation round trip: the server's own held-out users are scored either way)
PLAIN = COMMON + " dp=false secagg-max-weight=100 fraction-evaluate=0"


def _fedrec(*args: str, env: dict[str, str], log: Path, timeout: float = 60) -> tuple[int, str]:
    """Exit status and output. Output goes to a file, not a pipe: a SuperNode's children may
    outlive it holding a pipe open, and reading one to its end would then never finish."""
    with open(log, "w") as f:
        status = subprocess.run([*FEDREC, *args], env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
    return status, log.read_text(errors="replace")


def _alive_under(folder: Path) -> list[int]:
    """Processes whose environment mentions the test's folder: everything this test started."""
    return [pid for pid, _ in fc.processes(str(folder))]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the processes it started in /proc (Linux)")
def test_two_rounds_over_tls_with_authenticated_supernodes(tmp_path: Path) -> None:
    env = {**os.environ, "FEDREC_CACHE": str(tmp_path / "cache")}  # also marks every process started
    certs, data, out = tmp_path / "certs", tmp_path / "data", tmp_path / "out"
    assert _fedrec("certs", "--out", str(certs), "--nodes", "4", "--host", "localhost", "--host", "127.0.0.1",
                   env=env, log=tmp_path / "certs.log")[0] == 0
    write_device_files(Config.from_run_config(DATA), data, clients=3)
    address = f"127.0.0.1:{fc.free_port()}"
    tls = ["--root-certificates", str(certs / "ca.crt")]
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str, name: str) -> subprocess.Popen[bytes]:
        processes.append(fc.start_process([*FEDREC, *args], env, tmp_path / f"{name}.log"))
        return processes[-1]

    try:
        server = start("server", "--host", "127.0.0.1", "--port", address.split(":")[1], "--state-dir",
                       str(tmp_path / "server"), "--certfile", str(certs / "server.crt"), "--keyfile",
                       str(certs / "server.key"), "--ca-certfile", str(certs / "ca.crt"), name="server")
        fc.wait_listening(server, "127.0.0.1", int(address.split(":")[1]), tmp_path / "server.log")
        for i in (1, 2, 3):
            status, output = _fedrec("nodes", "register", str(certs / f"node-{i}.pub"), "--superlink", address, *tls,
                                     env=env, log=tmp_path / f"register-{i}.log")
            assert status == 0, output
        for i in (1, 2, 3):
            start("client", "--superlink", address, "--data", str(data / f"client-{i}.txt"), "--state-dir",
                  str(tmp_path / f"node-{i}"), "--auth-key", str(certs / f"node-{i}"), "--port", str(fc.free_port()),
                  *tls, name=f"node-{i}")

        # node-4's key was never registered; a plain-text node cannot speak to a TLS SuperLink (both with
        # Flower's stock launcher, `--cold`: the SuperNode itself refuses, before any ClientApp).
        refused = [_fedrec("client", "--superlink", address, "--data", str(data / "client-1.txt"), "--state-dir",
                           str(tmp_path / name), "--port", str(fc.free_port()), "--max-retries", "2",
                           "--max-wait-time", "10", "--cold", *extra, env=env, log=tmp_path / f"{name}.log",
                           timeout=90)
                   for name, extra in (("unregistered", [*tls, "--auth-key", str(certs / "node-4")]),
                                       ("plain", ["--insecure"]))]
        assert all(status != 0 for status, _ in refused)
        assert "Failed to activate SuperNode" in refused[0][1]

        status, output = _fedrec("run", "--superlink", address, *tls, "--dataset", "seq", "--data-dir",
                                 str(data / "server.txt"), "--out", str(out), "--rounds", "2", "--run-config", TRAINING,
                                 # a bound against hangs: each message starts a process (issue 17)
                                 env=env, log=tmp_path / "run.log", timeout=300)
        assert status == 0, output[-3000:]
        for secagg in (False, True):
            status, output = _fedrec("run", "--superlink", address, *tls, "--dataset", "seq", "--data-dir",
                                     str(data / "server.txt"), "--out", str(tmp_path / f"secagg-{secagg}"),
                                     "--rounds", "1", "--run-config", f"{PLAIN} secagg={str(secagg).lower()}",
                                     env=env, log=tmp_path / f"run-secagg-{secagg}.log", timeout=300)
            assert status == 0, output[-3000:]
    finally:
        for process in processes:
            fc.stop(process)
        fc.stop_pids(_alive_under(tmp_path))
    assert _alive_under(tmp_path) == []

    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["trained"] == 3 and r["failed"] == r["rejected"] == 0 for r in rounds[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["setting"]["partition"] == "devices" and summary["dp"]["clients_accounted"] == 3
    assert summary["setting"]["evaluation-users"] == 60  # the server's own file: 25% of 240 users
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["item_embedding.weight"].shape[0] == len(json.loads((out / "items.json").read_text())["item_ids"]) + 1
    for i in (1, 2, 3):  # each device's spent budget is on its own disk
        ledger = Ledger.load(tmp_path / f"node-{i}" / "privacy-ledger.json")
        assert 0 < ledger.epsilon(1e-5) <= 8
        assert "warm ClientApp" in (tmp_path / f"node-{i}.log").read_text()  # fedrec client's default

    # Over the real transport, as in process (tests/simulation/test_simulation.py): the devices train
    # identically, so the models differ only by SecAgg+'s quantisation (steps of 16 / 2**22).
    models = {s: torch.load(tmp_path / f"secagg-{s}" / "model.pt", weights_only=True) for s in (False, True)}
    summaries = {s: json.loads((tmp_path / f"secagg-{s}" / "summary.json").read_text()) for s in (False, True)}
    assert summaries[True]["secure_aggregation"]["enabled"] and not summaries[False]["secure_aggregation"]["enabled"]
    gaps = [(models[True][k] - models[False][k]).abs().max().item() for k in models[False]]
    assert 0 < max(gaps) < 2e-5


def test_run_exits_non_zero_when_the_run_fails(tmp_path: Path) -> None:
    """`flwr run --stream` exits 0 when the ServerApp fails; `fedrec run` must not: here the
    server's evaluation file does not exist, so the ServerApp raises in its first line."""
    env = {**os.environ, "FEDREC_CACHE": str(tmp_path / "cache")}
    port = fc.free_port()
    server = fc.start_process([*FEDREC, "server", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                               "--state-dir", str(tmp_path / "server")], env, tmp_path / "server.log")
    try:
        fc.wait_listening(server, "127.0.0.1", port, tmp_path / "server.log")
        status, output = _fedrec("run", "--superlink", f"127.0.0.1:{port}", "--insecure", "--dataset", "seq",
                                 "--data-dir", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out"),
                                 env=env, log=tmp_path / "run.log", timeout=120)
    finally:
        fc.stop(server)
        fc.stop_pids(_alive_under(tmp_path))
    assert status == 1
    assert "finished:failed" in output


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Exit status and stderr of `fedrec ARGS` run in this process (for errors raised before Flower starts)."""
    from fedrec.cli import main

    monkeypatch.setattr(sys, "argv", ["fedrec", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("run_config, message", [
    ("target-epsilom=1", "error: unknown setting 'target-epsilom': did you mean 'target-epsilon'?"),
    ("local-epochs=1 foo", "error: --run-config: 'foo' is not key=value: write e.g. 'local-epochs=1 dp=true'"),
    ("x=[", "error: --run-config: The provided configuration string is in an invalid format."),
    ("missing.toml", "error: missing.toml not found"),
])
def test_run_refuses_bad_run_config_before_contacting_flower(monkeypatch, capsys, run_config, message) -> None:
    code, err = _main(monkeypatch, capsys, "run", "--superlink", "127.0.0.1:1", "--insecure", "--out", "/tmp/o",
                      "--data-dir", "/tmp/d", "--run-config", run_config)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(message), err


@pytest.mark.parametrize("pem", ["garbage\n", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_client_refuses_garbage_root_certificates_before_starting(monkeypatch, capsys, tmp_path, pem) -> None:
    (tmp_path / "ca.crt").write_text(pem)
    (tmp_path / "data.txt").write_text("u1 1 2 3 4\nu2 2 3 4 5\n")
    code, err = _main(monkeypatch, capsys, "client", "--superlink", "127.0.0.1:1", "--data", str(tmp_path / "data.txt"),
                      "--root-certificates", str(tmp_path / "ca.crt"), "--state-dir", str(tmp_path / "state"))
    assert code == 2 and err.strip() == (f"error: --root-certificates {tmp_path / 'ca.crt'} holds no valid PEM "
                                         "certificate: give the CA certificate that signed the server's, e.g. ca.crt "
                                         "from `fedrec certs`")
    assert not (tmp_path / "state").exists()  # refused before the SuperNode's files were written


def test_client_refuses_a_ratings_file_as_seq(monkeypatch, capsys, tmp_path) -> None:
    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n")
    code, err = _main(monkeypatch, capsys, "client", "--superlink", "127.0.0.1:1", "--insecure",
                      "--data", str(tmp_path / "u.data"), "--state-dir", str(tmp_path / "state"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--data-format ml-100k" in err, err
    assert not (tmp_path / "state").exists()


def test_real_certificates_pass_the_check(tmp_path) -> None:
    from server import certs

    certs.create(tmp_path, ["localhost"], 0)
    certs.check_certificates(tmp_path / "ca.crt", "--root-certificates")
    certs.check_certificates(tmp_path / "server.crt", "--certfile")
