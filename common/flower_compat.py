"""Every use of Flower's private (non-public) API, in one place.

fedrec relies on a few pieces of flwr 1.42 that are not part of its public API: run and task
bookkeeping the in-process grid must fill in as a SuperLink would, FedAdam's moments for
checkpoints, the global `random` module Flower samples nodes with, a dtype quirk of FedAdam, the
parser `flwr run` reads `--run-config` with, SecAgg+, which 1.42 ships for its legacy API
only, the norm update of its adaptive clipping, whose sign 1.42 has the wrong way round, and
the SuperExec loop and ClientApp task runner the warm launcher drives.
Each is a small named function, subclass or re-export here, and tests/common/test_flower_compat.py
pins every one, so a Flower upgrade that changes them fails there first rather than in a run.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord, Message, UserConfigValue

# Legacy SecAgg+: server side (server/secagg.py) and client side (client/secagg.py).
from flwr.client.mod import secaggplus_mod

# Runs, tasks and messages (simulation/grid.py); `Run` is also the type of `Grid.set_run`.
from flwr.common import Code, FitIns, FitRes, Status, constant, parameters_to_ndarrays

# `--run-config` parsed as `flwr run` parses it (fedrec/deploy.py).
from flwr.common.config import parse_config_args
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggPlusKey
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, fitres_to_recorddict
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp.strategy import DifferentialPrivacyClientSideAdaptiveClipping, Strategy
from flwr.supercore.run import Run, RunStatus
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "CLIENTAPP_RUNTIME",
    "AdaptiveClipping",
    "FlooredSecAggPlusWorkflow",
    "MAIN_CONFIGS_RECORD",
    "MAIN_PARAMS_RECORD",
    "RECORD_KEY_CONFIGS",
    "RECORD_KEY_STATE",
    "SERVER_OPTIMIZER_STATE",
    "SERVER_TASK_ID",
    "SUPERLINK_NODE_ID",
    "Code",
    "ErrorCode",
    "FitIns",
    "FitRes",
    "GridClientProxy",
    "LegacyContext",
    "LegacyStrategy",
    "Run",
    "SecAggPlusKey",
    "SecAggPlusWorkflow",
    "Stage",
    "Status",
    "WorkflowKey",
    "arrayrecord_to_parameters",
    "cast_like",
    "fitres_to_recorddict",
    "is_clientapp_task",
    "launch_accepted",
    "launch_stock",
    "make_run",
    "parameters_to_ndarrays",
    "parse_config_args",
    "restore_server_optimizer",
    "run_clientapp_task",
    "run_superexec_with",
    "secaggplus_mod",
    "seed_flower_sampler",
    "server_optimizer_state",
    "server_task_identity",
    "set_message_id",
    "sleeps_between_pulls",
]

SERVER_TASK_ID = 1
"""The ServerApp's task id; `run_simulation` uses the same dummy id for its in-memory ServerApp."""

SERVER_OPTIMIZER_STATE = ("m_t", "v_t")
"""FedAdam's (FedOpt's) moments: plain attributes, `None` until the first aggregation."""


# --- Runs, tasks and messages, as a SuperLink sets them up (simulation/grid.py).


def make_run(run_id: int, run_config: Mapping[str, UserConfigValue]) -> Run:
    """A `Run` as a SuperLink would hand to the ServerApp (no FAB: the apps are in memory).

    Relies on `Run.create_empty`, the fields set here and `flwr.common.constant.Status`.
    """
    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(run_config)
    run.primary_task_id = SERVER_TASK_ID
    run.status = RunStatus(status=constant.Status.RUNNING, sub_status="", details="")
    return run


def set_message_id(message: Message, message_id: str) -> None:
    """Assign a message id the way Flower's own grids do: there is no public setter, so this
    writes the metadata's private ``_message_id``."""
    message.metadata.__dict__["_message_id"] = message_id


@contextmanager
def server_task_identity(run_id: int) -> Iterator[None]:
    """Act as the SuperLink's ServerApp task while inside the block.

    ``Message(content, dst_node_id, message_type)`` (how every strategy builds instructions)
    reads run_id, src_node_id and src_task_id from the process-global `TaskIdentity`;
    `flwr-serverapp` and `run_simulation` set it before calling the ServerApp. The previous
    values, its private ``_task_id``, ``_run_id`` and ``_node_id``, are restored so two
    in-process runs do not leak into each other.
    """
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = SERVER_TASK_ID
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


# --- Strategies (server/strategy.py, server/checkpoint.py).


def seed_flower_sampler(seed_text: str) -> None:
    """Make the next node sampling reproducible: Flower's strategies sample with the global
    `random` module (`flwr.serverapp.strategy.strategy_utils.sample_nodes`), and take no seed."""
    random.seed(seed_text)


def server_optimizer_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """FedAdam's moments (`m_t`, `v_t`) by name, for a checkpoint; empty for other strategies
    or before the first aggregation."""
    return {name: dict(getattr(strategy, name)) for name in SERVER_OPTIMIZER_STATE if getattr(strategy, name, None)}


def restore_server_optimizer(strategy: Strategy, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Give FedAdam back the moments `server_optimizer_state` took, so a resumed run steps on
    exactly as the interrupted one would have."""
    for name, values in state.items():
        setattr(strategy, name, dict(values))


def cast_like(arrays: ArrayRecord | None, reference: ArrayRecord) -> ArrayRecord | None:
    """The aggregate in the global model's dtypes: flwr 1.42's FedAdam returns float64 (NumPy
    promotes its float64 step size), which the next round's replies, float32, would not match."""
    if arrays is None or all(arrays[k].dtype == reference[k].dtype for k in reference.keys()):
        return arrays
    return ArrayRecord({k: Array(arrays[k].numpy().astype(reference[k].numpy().dtype)) for k in arrays.keys()})


def array_view(array: Array) -> np.ndarray:
    """An `Array`'s values without `Array.numpy()`'s cost: a read-only view of its bytes.

    Flower stores a NumPy array as the bytes of an `.npy` file; `numpy()` re-parses its header
    with `ast.literal_eval` every time, which costs more than the data on a model of 15 arrays,
    and copies. The values are the last `size × itemsize` bytes, in the dtype and shape the
    `Array` names, for a C-order array (the header says which).
    """
    if array.stype != "numpy.ndarray":
        return array.numpy()  # raises Flower's own error for another serialisation
    dtype = np.dtype(array.dtype)
    count = math.prod(array.shape)
    start = len(array.data) - count * dtype.itemsize
    if start < 0 or b"'fortran_order': False" not in array.data[:start]:
        return array.numpy()  # a Fortran-ordered (or malformed) array: let NumPy read it
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=start).reshape(array.shape)


def array_of(values: np.ndarray) -> Array:
    """`Array.from_numpy_ndarray(values)`, the same bytes, with the values copied once.

    `np.save` writes a fresh header and copies the values in chunks, then `getvalue()` copies
    them all again: a client's reply of 15 arrays paid that for every array. Here the `.npy`
    header (format 1.0, as `np.save` writes for these) is cached per dtype and shape, and the
    values are joined to it in one copy.
    """
    values = np.ascontiguousarray(values)
    descr, name = _dtype_names(values.dtype)
    header = _npy_header(descr, values.shape)
    return Array(name, tuple(values.shape), "numpy.ndarray", b"".join((header, values.reshape(-1).view(np.uint8))))


@functools.lru_cache(maxsize=64)
def _dtype_names(dtype: np.dtype) -> tuple[str, str]:
    """The `.npy` header's descr and `str(dtype)`; NumPy builds both afresh each time."""
    return np.lib.format.dtype_to_descr(dtype), str(dtype)


@functools.lru_cache(maxsize=1024)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    buffer = BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


class AdaptiveClipping(DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping with the norm moving the right way (Andrew et al.,
    2021: C <- C exp(-lr (unclipped fraction - target unclipped quantile))).

    flwr 1.42 counts the clipped updates but keeps the paper's sign, `C exp(-lr (clipped - target))`:
    a norm that clips too many updates shrinks and clips more, so it runs off to 0 or to infinity.
    Here, with `target_clipped_quantile` the share of updates meant to be clipped, a round that
    clipped more grows the norm and one that clipped fewer shrinks it. Everything else, the noised
    count included (and so the accounting), is Flower's."""

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))


class FlooredSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ that halts before unmasking a sum of fewer than `floor` clients.

    Flower's own check is per client (enough live neighbours to rebuild masks), so after dropouts
    it may unmask a sum of very few updates. Under distributed DP each client carries only
    1/`floor` of the noise variance, and a sum of fewer would leave the server with less noise than
    the ε was accounted for, so the round ends without a result instead. Reads the workflow
    state's `active_node_ids` (the clients whose masked vectors were summed) after Flower's stage."""

    def __init__(self, *args: object, floor: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.floor = floor

    def collect_masked_vectors_stage(self, grid: object, context: LegacyContext, state: WorkflowState) -> bool:
        if not super().collect_masked_vectors_stage(grid, context, state):
            return False
        return len(state.active_node_ids) >= self.floor


# --- The SuperExec loop with fedrec's warm launcher (client/warm.py). Imported when called: the
# ClientApp module imports this one, and must stay cheap to import.

CLIENTAPP_RUNTIME = "flwr.supernode.runtime.run_clientapp"
"""The module `flwr-clientapp` runs a task with; the warm launcher imports it before it forks."""


def run_superexec_with(executor: object, *, runtime_api_address: str, insecure: bool,
                       root_certificates_path: str | None) -> None:
    """Flower's SuperExec loop (what `flower-superexec` runs) with `executor` launching the tasks.

    `run_superexec` builds its executor with the module's `get_executor`, and 1.42 has no way to
    pass one in, so that name is replaced for the call. `executor` must satisfy 1.42's
    `Executor` protocol (`flwr.supercore.superexec.executor.types`); runtime dependency
    installation stays off, as fedrec turns it off everywhere."""
    from flwr.supercore.superexec import run_superexec as module

    original = module.get_executor
    module.get_executor = lambda *args, **kwargs: executor
    try:
        module.run_superexec(runtime_api_address=runtime_api_address, insecure=insecure,
                             root_certificates_path=root_certificates_path, runtime_dependency_install=False)
    finally:
        module.get_executor = original


def is_clientapp_task(spec: object) -> bool:
    """Whether a SuperExec `ExecutionSpec` asks for a ClientApp process."""
    from flwr.supercore.constant import TaskType

    return getattr(spec, "task_type", None) == TaskType.CLIENT_APP


def launch_stock(spec: object) -> object:
    """Flower's own launch of `spec`: a fresh `flwr-clientapp` (or other task) process."""
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    return SubprocessExecutor().launch(spec)


def launch_accepted() -> object:
    """The `LaunchResult` that tells the SuperExec loop a task was started."""
    from flwr.supercore.superexec.executor import LaunchResult

    return LaunchResult.accepted()


def run_clientapp_task(spec: object) -> None:
    """What a `flwr-clientapp --token ...` process does for the task `spec` names, in this process:
    pull the message and context, call the ClientApp, push the reply. Ends with Flower's
    `flwr_exit`, i.e. `SystemExit`.

    A forked process inherits the exit handlers its parent registered with Flower (the parent's
    SuperExec client and executor); they are dropped first, so the child's exit runs only its own."""
    from flwr.supercore.exit import exit_handler
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    exit_handler.registered_exit_handlers.clear()
    run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                  certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
                  parent_pid=None, runtime_dependency_install=False)


def sleeps_between_pulls(grid: object) -> bool:
    """Whether `grid` is flwr 1.42's deployed grid, whose `send_and_receive` sleeps 3 s between
    pulls for replies (`superlink/grid/http_grid.py`; Ray's in-memory grid sleeps 0.1 s)."""
    from flwr.superlink.grid.http_grid import HttpGrid

    return isinstance(grid, HttpGrid)
