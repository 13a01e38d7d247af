"""The command line as a user meets it: real jobs on tiny synthetic data, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedrec.cli import main

FAST = ["--epochs", "2", "--embedding-dim", "16", "--hidden-dim", "16", "--max-len", "15"]


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["fedrec", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def tiny_config(monkeypatch):
    """Shrink the synthetic default through the run config, as a user of `flwr run` would."""
    import common.config

    small = {**common.config.defaults(), "synthetic-users": 80, "synthetic-items": 40, "synthetic-groups": 5,
             "synthetic-min-len": 8, "synthetic-max-len": 20}
    monkeypatch.setattr(common.config, "defaults", lambda: small)


def test_train_then_recommend(monkeypatch, capsys, tmp_path):
    tiny_config(monkeypatch)
    out = tmp_path / "run"
    code, stdout, _ = run(monkeypatch, capsys, "train", "--out", str(out), *FAST, "--no-dp")
    assert code == 0 and "most popular" in stdout
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "summary.json", "model.pt", "items.json"}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dp"] == {"enabled": False} and 0 <= summary["test"]["ndcg@10"] <= 1
    state = torch.load(out / "model.pt", weights_only=True)
    assert "item_embedding.weight" in state and state["item_embedding.weight"].shape[0] == 41
    assert not list(tmp_path.glob(".run.partial-*"))

    code, stdout, _ = run(monkeypatch, capsys, "recommend", "--model", str(out), "--history", "3,7,12", "-k", "5",
                          "--explain")
    assert code == 0 and "attention over the history" in stdout
    top, explained = stdout.split("attention over the history")
    ranks = [line for line in top.splitlines() if line.startswith("│ ") and line.split("│")[1].strip().isdigit()]
    assert [int(r.split("│")[1]) for r in ranks] == [1, 2, 3, 4, 5]
    assert all(item in explained for item in ("3", "7", "12"))

    # The edge export recommends the same items as the run folder it came from.
    code, stdout_export, _ = run(monkeypatch, capsys, "export", "--model", str(out))
    assert code == 0 and "ms per recommendation" in stdout_export
    exported = out / "model.none.onnx"
    code, stdout2, _ = run(monkeypatch, capsys, "recommend", "--model", str(exported), "--history", "3,7,12", "-k",
                           "5", "--explain")
    assert code == 0 and stdout2.split("attention over the history")[0] == top
    code, _, err = run(monkeypatch, capsys, "export", "--model", str(out))
    assert code == 2 and "already exists" in err

    # The tied embedding is stored once; a model.pt from before, with an equal head.weight, still loads.
    assert "head.weight" not in state
    torch.save({**state, "head.weight": state["item_embedding.weight"]}, out / "model.pt")
    code, stdout3, _ = run(monkeypatch, capsys, "recommend", "--model", str(out), "--history", "3,7,12", "-k", "5")
    assert code == 0 and stdout3.strip() == top.strip()  # the same recommendations
    torch.save({**state, "head.weight": state["item_embedding.weight"] + 1}, out / "model.pt")
    code, _, err = run(monkeypatch, capsys, "recommend", "--model", str(out), "--history", "3,7,12")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: head.weight differs"), err


def test_train_with_dp_reports_epsilon(monkeypatch, capsys, tmp_path):
    tiny_config(monkeypatch)
    code, stdout, _ = run(monkeypatch, capsys, "train", "--out", str(tmp_path / "dp"), *FAST, "--dp",
                          "--target-epsilon", "4", "--batch-size", "16")
    assert code == 0
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["dp"]["enabled"] and 3.5 < summary["dp"]["epsilon"] <= 4.0 + 1e-6
    assert "training window" in summary["dp"]["unit"]


def test_data_stats(monkeypatch, capsys):
    tiny_config(monkeypatch)
    code, stdout, _ = run(monkeypatch, capsys, "data", "stats")
    assert code == 0 and "users" in stdout and "80" in stdout


def _u_data(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "u.data").write_text(text)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "not found"),
        ("delimiter", "delimiter"),
        ("non-numeric", "no valid"),
        ("empty", "empty"),
        ("column", "column"),
        ("max-len", "max-len must be positive"),
        ("history", "unknown item ids"),
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(monkeypatch, capsys, tmp_path, case, expected):
    out = tmp_path / "out"
    args = {
        "missing": ["--dataset", "ml-100k", "--data-dir", str(tmp_path / "nowhere")],
        "delimiter": ["--dataset", "ml-100k", "--data-dir", str(_u_data(tmp_path / "delimiter",
                                                                        "1,2,5,100\n2,3,4,101\n"))],
        "non-numeric": ["--dataset", "ml-100k", "--data-dir", str(_u_data(tmp_path / "non-numeric",
                                                                          "a\tb\t5\t100\nc\td\t4\t101\n"))],
        "empty": ["--dataset", "ml-100k", "--data-dir", str(_u_data(tmp_path / "empty", ""))],
        "column": ["--dataset", "csv", "--data-dir", str(_write(tmp_path / "x.csv", "user,thing\n1,2\n"))],
        "max-len": ["--max-len", "-3"],
    }
    if case == "history":
        tiny_config(monkeypatch)
        assert run(monkeypatch, capsys, "train", "--out", str(out), *FAST)[0] == 0
        code, stdout, err = run(monkeypatch, capsys, "recommend", "--model", str(out), "--history", "999999")
    else:
        code, stdout, err = run(monkeypatch, capsys, "train", "--out", str(out), *args[case])
        assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["server", "--port", "1"], "TLS needs --certfile"),
        (["server", "--certfile", "a", "--keyfile", "b", "--ca-certfile", "c"], "a not found"),
        (["client", "--superlink", "h:1", "--data", "d.txt"], "TLS needs --root-certificates"),
        (["client", "--superlink", "h:1", "--data", "nowhere.txt", "--insecure"], "not found"),
        (["run", "--superlink", "h:1", "--insecure", "--run-config", "local-epochs=0"],
         "local-epochs must be positive"),
        (["nodes", "list", "--superlink", "h:1", "--root-certificates", "ca.crt"], "ca.crt not found"),
        (["export", "--model", ".", "--quantize", "int4"], "--quantize must be one of"),
        (["recommend", "--model", "README.md", "--history", "1"], "is not a fedrec export"),
        (["data", "split", "--out", "split", "--holdout-users", "0"], "holdout-users"),
        (["privacy"], "give --run DIR or --ledger FILE"),
        (["run", "--superlink", "h:1", "--insecure", "--out", "runs/x"], "must be an absolute path on the server"),
        (["privacy", "--run", "."], "privacy.json not found"),
        (["simulate", "--attack", "flood", "--out", "x"], "attack must be one of"),
        (["simulate", "--attack", "target", "--out", "x"], "attack = target needs target-item"),
        (["simulate", "--aggregation", "krum", "--secagg", "--out", "x"],
         "aggregation = krum needs server-strategy = fedavg"),
        (["simulate", "--attack", "target", "--target-item", "nope", "--out", "x"], "item 'nope' is not an item"),
    ],
)
def test_deployment_and_export_commands_check_their_input(monkeypatch, capsys, tmp_path, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("not a model")
    code, _, err = run(monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


def test_existing_output_is_not_overwritten(monkeypatch, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier run")
    code, _, err = run(monkeypatch, capsys, "train", "--out", str(out), *FAST)
    assert code != 0 and "not empty" in err and (out / "keep.txt").read_text() == "earlier run"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_resume_refuses_settings_it_would_ignore(monkeypatch, capsys, tmp_path):
    """A resumed run keeps the settings it started with: options that would change them are refused."""
    code, _, err = run(monkeypatch, capsys, "simulate", "--resume", str(tmp_path), "--rounds", "9",
                       "--target-epsilon", "1")
    assert code == 2
    assert err.strip() == ("error: --resume continues the run with the settings it started with: "
                           "drop --target-epsilon, --rounds")
    assert not any(tmp_path.iterdir())


def _one_error_line(code: int, err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if "cache" not in p.parts]


@pytest.mark.parametrize("args, expected", [
    (["--seed", "-1"], "seed must be an integer from 0 to 4294967295, got -1"),
    (["--seed", "18446744073709551616"], "seed must be an integer from 0 to 4294967295"),
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--max-grad-norm", "inf"], "max-grad-norm must be a finite number, got inf"),
    (["--noise-multiplier", "inf"], "noise-multiplier must be a finite number, got inf"),
    (["--max-len", "1099511627776"], "max-len must be at most 100,000"),
    (["--embedding-dim", "2147483648"], "embedding-dim must be at most 65,536"),
])
@pytest.mark.parametrize("command", ["train", "simulate"])
def test_out_of_range_settings_give_one_line(monkeypatch, capsys, tmp_path, command, args, expected):
    code, _, err = run(monkeypatch, capsys, command, "--out", str(tmp_path / "out"), *args)
    _one_error_line(code, err, expected)
    assert not (tmp_path / "out").exists() and not _hidden(tmp_path)


def _read_only(folder: Path, monkeypatch) -> Path:
    """A folder this process cannot write to. Root writes anywhere, so for root `os.access` answers
    as the kernel answers any other user (the refusal and its clean-up are still the real code's)."""
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: not (Path(path) == folder and mode & os.W_OK)
                            and access(path, mode, **kw))
    return folder


@pytest.mark.parametrize("case, expected", [
    ("file", "is a file: give a folder"),
    ("under-file", "is a file, not a folder"),
    ("read-only", "is not writable: choose a folder you can write to"),
    ("under-read-only", "is not writable"),
])
@pytest.mark.parametrize("command", ["train", "simulate"])
def test_unusable_out_is_refused_before_any_work(monkeypatch, capsys, tmp_path, command, case, expected):
    (tmp_path / "file").write_text("not a folder")
    out = {"file": tmp_path / "file", "under-file": tmp_path / "file" / "run",
           "read-only": tmp_path / "ro", "under-read-only": tmp_path / "ro" / "run"}[case]
    if "read-only" in case:
        _read_only(tmp_path / "ro", monkeypatch)
    started = []  # no work may start: neither train's data loading nor the simulation's federation
    monkeypatch.setattr("simulation.centralized.load_dataset", lambda cfg: started.append(cfg))
    monkeypatch.setattr("simulation.run.federation", lambda cfg: started.append(cfg))
    code, _, err = run(monkeypatch, capsys, command, "--out", str(out), *FAST[2:])
    _one_error_line(code, err, expected)
    assert not started and not _hidden(tmp_path) and (tmp_path / "file").read_text() == "not a folder"
    assert not (tmp_path / "ro").exists() or not list((tmp_path / "ro").iterdir())


def test_sigterm_stops_train_like_ctrl_c(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedrec", "train", "--out", str(out), "--epochs", "1000", "--no-dp",
               "--max-len", "10", "--embedding-dim", "8", "--hidden-dim", "8", "--quiet"]
    job = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".run.partial-*")) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert list(tmp_path.glob(".run.partial-*")), "training never started"
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines() == ["error: stopped by SIGTERM (kill), leaving nothing half-written: run the "
                                        "command again (or `fedrec simulate --resume` the simulation's folder)"]
    assert not out.exists() and not _hidden(tmp_path)


def test_corrupt_run_files_give_one_line(monkeypatch, capsys, tmp_path):
    tiny_config(monkeypatch)
    run_dir = tmp_path / "run"
    assert run(monkeypatch, capsys, "train", "--out", str(run_dir), *FAST, "--no-dp")[0] == 0
    intact = {name: (run_dir / name).read_bytes() for name in ("config.json", "items.json", "model.pt")}
    for name, cut, expected in [("items.json", 100, "items.json is not valid JSON (truncated or corrupt?)"),
                                ("config.json", 40, "config.json is not valid JSON (truncated or corrupt?)"),
                                ("model.pt", 1000, "model.pt is truncated or not a fedrec file"),
                                ("model.pt", 0, "model.pt is truncated or not a fedrec file (EOFError)")]:
        (run_dir / name).write_bytes(intact[name][:cut])
        code, _, err = run(monkeypatch, capsys, "recommend", "--model", str(run_dir), "--history", "3,7")
        _one_error_line(code, err, expected)
        (run_dir / name).write_bytes(intact[name])

    code, _, err = run(monkeypatch, capsys, "export", "--model", str(run_dir), "--out", str(tmp_path / "no" / "m.pt"))
    _one_error_line(code, err, f"folder {tmp_path / 'no'} does not exist: create it")
    assert not (tmp_path / "no").exists()
    assert run(monkeypatch, capsys, "export", "--model", str(run_dir))[0] == 0
    exported = run_dir / "model.none.onnx"
    code, _, err = run(monkeypatch, capsys, "export", "--model", str(exported), "--out", str(tmp_path / "again.pt"))
    _one_error_line(code, err, f"--model {exported} is a file: give the --out folder of a finished run")
    exported.write_bytes(b"")
    code, _, err = run(monkeypatch, capsys, "recommend", "--model", str(exported), "--history", "3,7")
    _one_error_line(code, err, "is not a fedrec export: ")
    assert not _hidden(tmp_path)


def test_resume_of_corrupt_checkpoint_or_config_gives_one_line(monkeypatch, capsys, tmp_path):
    tiny_config(monkeypatch)
    run_dir = tmp_path / "sim"
    args = ["simulate", "--out", str(run_dir), "--partition", "iid", "--num-clients", "2", "--fraction-train", "1",
            "--rounds", "1", "--no-dp", "--no-central-dp", *FAST[2:]]
    assert run(monkeypatch, capsys, *args, "--quiet")[0] == 0
    for name, cut, expected in [("checkpoint.pt", 0, "checkpoint.pt is truncated or not a fedrec file (EOFError)"),
                                ("checkpoint.pt", 2000, "checkpoint.pt is truncated or not a fedrec file"),
                                ("config.json", 40, "config.json is not valid JSON (truncated or corrupt?)")]:
        intact = (run_dir / name).read_bytes()
        (run_dir / name).write_bytes(intact[:cut])
        metrics = (run_dir / "metrics.jsonl").read_text()
        code, _, err = run(monkeypatch, capsys, "simulate", "--resume", str(run_dir))
        _one_error_line(code, err, expected)
        assert (run_dir / "metrics.jsonl").read_text() == metrics  # refused before anything changed
        (run_dir / name).write_bytes(intact)
    assert not _hidden(tmp_path)


def test_crafted_ledger_with_absurd_steps_fails_in_one_line(monkeypatch, capsys, tmp_path):
    from common.privacy import Ledger

    path = tmp_path / "privacy-ledger.json"
    path.write_text(Ledger(((1.0, 0.01, 10**12),)).to_json())
    code, _, err = run(monkeypatch, capsys, "privacy", "--ledger", str(path))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "holds 1,000,000,000,000 DP steps, more than any run takes" in lines[0]


def test_a_folder_no_one_can_write_is_refused_whatever_its_permission_bits(monkeypatch, capsys):
    """The kernel's /sys refuses new files even to root, whose permission checks always pass: the
    probe write catches what `os.access` misses (read-only mounts too)."""
    import tempfile

    try:
        tempfile.TemporaryFile(dir="/sys").close()
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    for command in ("train", "simulate"):
        code, _, err = run(monkeypatch, capsys, command, "--out", "/sys/fedrec-run", *FAST[2:])
        _one_error_line(code, err, "/sys is not writable")


@pytest.mark.parametrize("command", ["train", "simulate"])
def test_evaluation_protocol_and_central_dp_options_reach_the_run_config(monkeypatch, capsys, tmp_path, command):
    """--mask-history changes what every number means, so both training commands take it; simulate
    also takes the federated evaluation share and the adaptive clipping keys."""
    seen = []
    target = "simulation.centralized.train_centralized" if command == "train" else "simulation.run.simulate"
    monkeypatch.setattr(target, lambda cfg, *a, **k: seen.append(cfg) or (_ for _ in ()).throw(SystemExit(0)))
    extra = [] if command == "train" else ["--fraction-evaluate", "0", "--central-clip-quantile", "0.3",
                                           "--central-clip-lr", "0.1"]
    run(monkeypatch, capsys, command, "--out", str(tmp_path / "run"), "--mask-history", *extra)
    assert seen and seen[0].mask_history is True
    if command == "simulate":
        assert (seen[0].fraction_evaluate, seen[0].central_clip_quantile, seen[0].central_clip_lr) == (0.0, 0.3, 0.1)
