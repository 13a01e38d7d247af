"""The cheap ClientApp import and the warm launcher: a child forked per ClientApp task, reaped,
from a parent that runs no other thread; the SuperNode's exit ends it. (A whole deployment in
warm mode runs in tests/fedrec/test_deploy.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from client.supernode import supernode_command


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_importing_the_client_app_loads_neither_torch_nor_opacus_nor_pandas() -> None:
    done = _python("""
        import sys
        import client.client_app
        print(sorted(m for m in ("torch", "opacus", "pandas", "client.local") if m in sys.modules))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_each_clientapp_task_runs_in_a_forked_child_of_a_single_threaded_parent(tmp_path: Path) -> None:
    """Three tasks, each through a stand-in for Flower's task runner that records its process;
    a task of another type goes to Flower's own launcher; the SuperNode's exit ends the launcher
    with its status."""
    done = _python(f"""
        import json, os, subprocess, sys, time, types
        from client import warm

        for module in warm.PRELOAD:
            __import__(module)
        parent = {{"pid": os.getpid(), "threads": warm.threads()}}
        def task(spec):
            with open(os.path.join({str(tmp_path)!r}, f"task-{{spec.token}}.json"), "w") as f:
                json.dump({{"pid": os.getpid(), "parent": os.getppid()}}, f)
            raise SystemExit(0)
        warm.run_clientapp_task = task
        stock = []
        warm.launch_stock = lambda spec: stock.append(spec.token)
        supernode = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(2); sys.exit(3)"])
        executor = warm.ForkingExecutor(supernode)
        for token in ("a", "b", "c"):
            executor.launch(types.SimpleNamespace(task_type="flwr-clientapp", token=token))
        executor.launch(types.SimpleNamespace(task_type="flwr-serverapp", token="s"))
        try:
            while True:
                executor.reconcile()
                time.sleep(0.05)
        except SystemExit as end:
            parent.update(status=end.code, unreaped=len(executor.children), stock=stock)
        print(json.dumps(parent))
    """, OPENBLAS_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr
    parent = json.loads(done.stdout.strip().splitlines()[-1])
    assert parent["threads"] == 1  # forking is safe: torch and Opacus imported, no thread started
    assert parent["status"] == 3 and "the SuperNode exited (status 3)" in done.stderr
    assert parent["unreaped"] == 0 and parent["stock"] == ["s"]
    tasks = [json.loads((tmp_path / f"task-{t}.json").read_text()) for t in "abc"]
    assert all(t["parent"] == parent["pid"] for t in tasks)
    assert len({t["pid"] for t in tasks} | {parent["pid"]}) == 4  # a process of its own per task


def test_the_launcher_refuses_to_fork_with_threads_running() -> None:
    """Without OPENBLAS_NUM_THREADS=1 numpy's BLAS starts a thread pool on import (2 cores and up)."""
    done = _python("""
        import subprocess, sys, threading, time
        from client import warm
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            warm.serve(supernode, "127.0.0.1:1")
        finally:
            print("supernode stopped:", supernode.wait(timeout=10) is not None)
    """)
    assert done.returncode == 1
    assert "threads run in the warm launcher, and forking it would be unsafe" in done.stderr
    assert "supernode stopped: True" in done.stdout


@pytest.mark.parametrize("warm", [True, False])
def test_a_warm_supernode_leaves_launching_to_fedrec(tmp_path: Path, warm: bool) -> None:
    command = supernode_command(Path("/bin"), superlink="127.0.0.1:9092", data=tmp_path / "d.txt", data_format="seq",
                                state_dir=tmp_path, port=9094, root_certificates=None, auth_key=None,
                                max_retries=None, max_wait_time=None, warm=warm)
    assert ("--isolation" in command) == warm
    if warm:
        assert command[command.index("--isolation") + 1] == "process"
