"""The warm ClientApp launcher: Flower's SuperExec loop, each task forked from a process that
imported torch, Opacus and the ClientApp once.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message, which imports torch, Opacus
and the app anew: seconds per message on a small device, several times a round. `fedrec client`
runs its SuperNode with `--isolation process` and this launcher beside it. The launcher imports
the app once, then runs Flower's own SuperExec loop; for each ClientApp task it forks a child that
runs Flower's own task code (`run_clientapp`: pull the message, call the ClientApp, push the
reply) and exits. Every message still gets a process of its own, so what a task computes and
replies is what the stock launcher's process would.

What it changes (README, "Deploy"): the app version is the one imported when `fedrec client`
started (a new one is picked up on restart), runs share the parent's imported modules, and
dependencies are never installed per run. The parent starts no threads and runs no torch ops, so
forking is safe; it reaps its children, and ends with the SuperNode.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

from common.flower_compat import (
    CLIENTAPP_RUNTIME,
    is_clientapp_task,
    launch_accepted,
    launch_stock,
    run_clientapp_task,
    run_superexec_with,
)

PRELOAD = ("client.client_app", "client.local", CLIENTAPP_RUNTIME)  # what every child would import


class ForkingExecutor:
    """A SuperExec executor (Flower's `Executor` protocol) that forks per ClientApp task, and
    owns the SuperNode it serves: the SuperNode's exit ends the launcher, and the launcher's
    stops the SuperNode."""

    def __init__(self, supernode: subprocess.Popen[bytes]) -> None:
        self.supernode = supernode
        self.children: set[int] = set()
        self._owner = os.getpid()

    def get_eligible_capacity(self, supported_task_types: set, *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set, set[str]]:
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: object = None, *, fab_hash: str | None = None, insecure: bool = False,
                          root_certificates_path: str | None = None) -> None:
        """No gate: one device, one task at a time is the SuperNode's business."""

    def launch(self, spec: object) -> object:
        if not is_clientapp_task(spec):
            return launch_stock(spec)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # reap only children it knows of
        try:
            pid = os.fork()
            if pid == 0:
                _run_child(spec)
            self.children.add(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        return launch_accepted()

    def reconcile(self) -> None:
        """On every child's exit (SIGCHLD) and between polls: reap finished children; end when the
        SuperNode has. The signal matters: while the SuperNode is unreachable, Flower's loop retries
        its request forever and would never come back to ask."""
        for pid in list(self.children):
            if os.waitpid(pid, os.WNOHANG)[0]:
                self.children.discard(pid)
        status = self.supernode.poll()
        if status is not None:
            print(f"fedrec client: the SuperNode exited (status {status})", file=sys.stderr, flush=True)
            raise SystemExit(status)

    def close(self) -> None:
        if os.getpid() != self._owner:  # a child's exit must not stop its parent's SuperNode
            return
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.supernode.poll() is None:
            self.supernode.terminate()
            try:
                self.supernode.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.supernode.kill()


def _run_child(spec: object) -> None:
    """The forked child: one task through Flower's own ClientApp code, then exit (never returns,
    and never runs the parent's cleanup)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    status = 1
    try:
        run_clientapp_task(spec)
        status = 0
    except SystemExit as done:  # Flower's flwr_exit
        status = done.code if isinstance(done.code, int) else int(done.code is not None)
    except BaseException:  # reported; the task fails as a crashed process's would
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def threads() -> int:
    """Threads of this process, native ones included (a BLAS pool is invisible to `threading`)."""
    tasks = Path("/proc/self/task")
    return len(list(tasks.iterdir())) if tasks.is_dir() else threading.active_count()


def serve(supernode: subprocess.Popen[bytes], runtime_api_address: str) -> None:
    """Import the app once, then launch the SuperNode's tasks until it exits (or this process is
    stopped, which stops it). The SuperNode's Runtime API is on loopback, in plain text."""
    for module in PRELOAD:
        importlib.import_module(module)
    running = threads()
    if running > 1:
        supernode.terminate()
        raise SystemExit(f"fedrec client: {running} threads run in the warm launcher, and forking it would be "
                         "unsafe: start it with OPENBLAS_NUM_THREADS=1 (as `fedrec client` does), or use --cold")
    executor = ForkingExecutor(supernode)
    signal.signal(signal.SIGCHLD, lambda signum, frame: executor.reconcile())
    try:
        run_superexec_with(executor, runtime_api_address=runtime_api_address, insecure=True,
                           root_certificates_path=None)
    finally:
        executor.close()


def main() -> None:
    """`python -m client.warm RUNTIME_API_ADDRESS SUPERNODE_COMMAND...`: what `fedrec client` becomes
    (same PID) once it has checked its inputs. A fresh interpreter: `fedrec client`'s own imports
    start native threads (numpy's BLAS pool) that must not exist when it forks."""
    address, *command = sys.argv[1:]
    serve(subprocess.Popen(command), address)


if __name__ == "__main__":
    main()
