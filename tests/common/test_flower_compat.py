"""Pins every private piece of Flower that common/flower_compat.py wraps: a flwr upgrade that changes
one fails here, by name, before it fails somewhere in a run."""

from __future__ import annotations

import copy
import math
import random
import types

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from common import flower_compat as fc

NODES = types.SimpleNamespace(get_node_ids=lambda: range(100, 120))  # all a strategy's sampling asks of a Grid


def test_every_name_is_there() -> None:
    missing = [name for name in fc.__all__ if not hasattr(fc, name)]
    assert not missing, f"flower_compat lost {missing}"


def test_server_task_identity_sets_and_restores_the_private_fields() -> None:
    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    with fc.server_task_identity(run_id=42):
        msg = Message(RecordDict(), 100, MessageType.TRAIN)  # reads the process-global identity
    assert (msg.metadata.run_id, msg.metadata.src_node_id) == (42, fc.SUPERLINK_NODE_ID)
    assert msg.metadata.src_task_id == fc.SERVER_TASK_ID
    assert (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id) == before


def test_set_message_id_writes_the_metadata() -> None:
    with fc.server_task_identity(run_id=1):
        msg = Message(RecordDict(), 100, MessageType.TRAIN)
    fc.set_message_id(msg, "abc")
    assert msg.metadata.message_id == "abc"
    assert Message(RecordDict(), reply_to=msg).metadata.reply_to_message_id == "abc"


def test_make_run_fills_what_a_superlink_would() -> None:
    run = fc.make_run(7, {"k": 1})
    assert isinstance(run, fc.Run) and (run.run_id, run.override_config) == (7, {"k": 1})
    assert run.primary_task_id == fc.SERVER_TASK_ID and run.status.status == "running"
    assert fc.Run(**vars(run)) == run  # how a Grid hands out copies


def test_superlink_node_id_and_error_codes() -> None:
    assert fc.SUPERLINK_NODE_ID == 1
    assert {fc.ErrorCode.UNKNOWN, fc.ErrorCode.CLIENT_APP_RAISED_EXCEPTION} == {0, 2}  # as flwr-clientapp sends them


def _sampled(strategy: FedAvg, seed_text: str) -> list[int]:
    fc.seed_flower_sampler(seed_text)
    with fc.server_task_identity(run_id=1):
        messages = strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2))}), ConfigRecord(), NODES)
    return [m.metadata.dst_node_id for m in messages]


def test_seeding_makes_flower_sample_the_same_nodes() -> None:
    strategy = FedAvg(fraction_train=0.3)
    first = _sampled(strategy, "7/train/1")
    random.random()  # whatever else used the global random module in between
    assert _sampled(strategy, "7/train/1") == first and len(first) == 6
    assert _sampled(strategy, "7/train/2") != first


def _adam_round(strategy: FedAdam, server_round: int, shift: float) -> ArrayRecord:
    """One FedAdam round from w = 1 (float32): the 20 nodes reply w + shift + i."""
    start = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    with fc.server_task_identity(run_id=1):
        messages = list(strategy.configure_train(server_round, start, ConfigRecord(), NODES))
        replies = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(3, 1 + shift + i, np.float32))}),
                                       "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)
                   for i, m in enumerate(messages)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays


def test_fedadam_moments_are_saved_and_restored() -> None:
    assert fc.server_optimizer_state(FedAdam()) == {}  # nothing before the first aggregation
    assert fc.server_optimizer_state(FedAvg()) == {}
    interrupted = FedAdam(eta=0.1)
    _adam_round(interrupted, 1, shift=0.5)
    state = fc.server_optimizer_state(interrupted)
    assert set(state) == set(fc.SERVER_OPTIMIZER_STATE) and all(set(v) == {"w"} for v in state.values())
    saved = copy.deepcopy(state)
    expected = _adam_round(interrupted, 2, shift=-0.2)["w"].numpy()

    resumed = FedAdam(eta=0.1)
    fc.restore_server_optimizer(resumed, saved)
    np.testing.assert_array_equal(_adam_round(resumed, 2, shift=-0.2)["w"].numpy(), expected)
    fresh = _adam_round(FedAdam(eta=0.1), 2, shift=-0.2)["w"].numpy()
    assert not np.allclose(fresh, expected)  # the moments matter: without them round 2 steps elsewhere


def test_fedadam_returns_float64_and_cast_like_restores_float32() -> None:
    reference = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    aggregate = _adam_round(FedAdam(eta=0.1), 1, shift=0.5)
    assert aggregate["w"].numpy().dtype == np.float64, "flwr's FedAdam keeps float32 now: cast_like can go"
    cast = fc.cast_like(aggregate, reference)
    assert cast["w"].numpy().dtype == np.float32
    np.testing.assert_array_equal(cast["w"].numpy(), aggregate["w"].numpy().astype(np.float32))
    assert fc.cast_like(reference, reference) is reference and fc.cast_like(None, reference) is None


def test_parse_config_args_reads_run_config_overrides() -> None:
    assert fc.parse_config_args(["lr=0.1 dataset='ml-100k' dp=true"]) == {"lr": 0.1, "dataset": "ml-100k", "dp": True}


def test_legacy_secaggplus_pieces_behave_as_server_and_client_use_them() -> None:
    """The whole protocol runs in tests/server/test_secagg.py; this pins the legacy pieces one by one."""
    arrays = ArrayRecord({"a": Array(np.arange(3, dtype=np.float32)), "b": Array(np.ones((2, 2)))})
    parameters = fc.arrayrecord_to_parameters(arrays, keep_input=True)
    back = fc.parameters_to_ndarrays(parameters)  # in key order, dtypes kept
    assert [x.dtype for x in back] == [np.float32, np.float64]
    np.testing.assert_array_equal(back[0], arrays["a"].numpy())
    assert fc.FitIns(parameters, {"server-round": 1}).config == {"server-round": 1}

    fit_res = fc.FitRes(fc.Status(fc.Code.OK, ""), parameters, 7, {"train-loss": 0.5})
    content = fc.fitres_to_recorddict(fit_res, keep_input=True)
    assert {"fitres.parameters", "fitres.metrics", "fitres.num_examples", "fitres.status"} <= set(content.keys())
    assert content.config_records["fitres.metrics"]["train-loss"] == 0.5

    fc.SecAggPlusWorkflow(3, 2, max_weight=10.0, clipping_range=8.0, quantization_range=2**22,
                          modulus_range=2**32, timeout=None)  # the settings server/secagg.py passes
    assert callable(fc.secaggplus_mod)
    assert fc.LegacyStrategy.__abstractmethods__ <= {"initialize_parameters", "configure_fit", "aggregate_fit",
                                                     "configure_evaluate", "aggregate_evaluate", "evaluate"}
    context = fc.LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    context.state.config_records[fc.MAIN_CONFIGS_RECORD] = ConfigRecord({fc.WorkflowKey.CURRENT_ROUND: 3})
    assert context.state.config_records[fc.MAIN_CONFIGS_RECORD][fc.WorkflowKey.CURRENT_ROUND] == 3
    assert isinstance(fc.MAIN_PARAMS_RECORD, str)
    assert fc.GridClientProxy(1000, NODES, 1).node_id == 1000
    assert fc.Stage.UNMASK in fc.Stage.all() and isinstance(fc.SecAggPlusKey.STAGE, str)
    assert {fc.RECORD_KEY_CONFIGS, fc.RECORD_KEY_STATE} == {"secaggplus_configs", "secaggplus_state"}



@pytest.mark.parametrize("values", [np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 2)),
                                    np.array(3.5), np.arange(6, dtype=np.int64)[::2],
                                    np.asfortranarray(np.arange(6.0).reshape(2, 3))])
def test_array_view_reads_what_numpy_reads(values):
    """The npy layout `array_view` relies on: the values are the bytes' tail, in the Array's dtype and shape."""
    from common.flower_compat import array_view

    array = Array(values)
    view = array_view(array)
    assert view.dtype == array.numpy().dtype and view.shape == array.numpy().shape
    np.testing.assert_array_equal(view, array.numpy())


@pytest.mark.parametrize("values", [np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 2)),
                                    np.array(3.5), np.arange(6, dtype=np.int64)[::2],
                                    np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.ones((7, 5), dtype=np.float16)])
def test_array_of_writes_the_bytes_flower_writes(values):
    """`array_of` is `Array.from_numpy_ndarray` byte for byte (a Fortran-ordered input comes out
    C-ordered, as the same values)."""
    from common.flower_compat import array_of

    ours, flowers = array_of(values), Array.from_numpy_ndarray(np.ascontiguousarray(values))
    assert (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    assert ours.data == flowers.data
    np.testing.assert_array_equal(ours.numpy(), values)


def test_adaptive_clipping_moves_the_norm_the_way_flowers_does_not():
    """flwr 1.42 shrinks the norm when more updates were clipped than targeted (the paper's sign
    on the clipped, not the unclipped, fraction); fedrec's subclass grows it. When an upgrade
    fixes Flower's sign, the first assertion fails and the subclass can go."""
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideAdaptiveClipping

    norms = {}
    for kind in (DifferentialPrivacyClientSideAdaptiveClipping, fc.AdaptiveClipping):
        strategy = kind(FedAvg(), 0.1, 10, initial_clipping_norm=1.0, target_clipped_quantile=0.5, clip_norm_lr=0.2)
        strategy._geometric_update(1.0)  # every update clipped: the norm is too small
        norms[kind] = strategy.clipping_norm
    assert norms[DifferentialPrivacyClientSideAdaptiveClipping] < 1.0 < norms[fc.AdaptiveClipping]
    assert norms[fc.AdaptiveClipping] == pytest.approx(math.exp(0.2 * 0.5))


def test_the_secaggplus_floor_hooks_the_stage_and_state_flower_names() -> None:
    """FlooredSecAggPlusWorkflow overrides Flower's masked-vector stage and reads the clients it summed."""
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    assert callable(fc.SecAggPlusWorkflow.collect_masked_vectors_stage)
    assert isinstance(WorkflowState().active_node_ids, set)
    workflow = fc.FlooredSecAggPlusWorkflow(3, 2, floor=4)
    assert workflow.floor == 4 and workflow.reconstruction_threshold == 2


def test_the_superexec_loop_builds_its_executor_with_the_name_replaced() -> None:
    """`run_superexec_with` swaps `run_superexec.get_executor` for the call: the loop must still
    look the name up there, take the arguments passed, and put the original back."""
    import inspect

    from flwr.supercore.superexec import run_superexec as module

    original = module.get_executor
    sentinel = object()

    def stop(*args: object, **kwargs: object) -> None:
        assert module.get_executor() is sentinel
        raise KeyboardInterrupt

    module_run = module.run_superexec
    module.run_superexec = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            fc.run_superexec_with(sentinel, runtime_api_address="127.0.0.1:1", insecure=True,
                                  root_certificates_path=None)
    finally:
        module.run_superexec = module_run
    assert module.get_executor is original
    assert "get_executor(" in inspect.getsource(module.run_superexec)
    assert {"runtime_api_address", "insecure", "root_certificates_path", "runtime_dependency_install"} <= set(
        inspect.signature(module.run_superexec).parameters)


def test_the_executor_protocol_and_task_spec_are_what_the_warm_launcher_implements() -> None:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec, Executor, LaunchResultStatus

    from client.warm import ForkingExecutor

    wanted = {name for name in vars(Executor) if not name.startswith("_")}
    assert wanted == {"get_eligible_capacity", "wait_for_capacity", "launch", "reconcile", "close"}
    assert wanted <= set(vars(ForkingExecutor))
    spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token="t",
                         insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                         parent_pid=None, suppress_output=False, task_id=1)
    assert fc.is_clientapp_task(spec)
    assert not fc.is_clientapp_task(ExecutionSpec(**{**vars(spec), "task_type": TaskType.SERVER_APP}))
    assert fc.launch_accepted().status == LaunchResultStatus.ACCEPTED


def test_a_clientapp_task_runs_through_flowers_own_runner_without_inherited_exit_handlers(monkeypatch) -> None:
    import inspect

    from flwr.supercore.exit import exit_handler
    from flwr.supernode.runtime import run_clientapp as runtime

    assert fc.CLIENTAPP_RUNTIME == runtime.__name__
    assert set(inspect.signature(runtime.run_clientapp).parameters) == {
        "runtime_api_address", "token", "insecure", "certificates", "parent_pid", "runtime_dependency_install"}
    calls = []
    monkeypatch.setattr(runtime, "run_clientapp", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(exit_handler, "registered_exit_handlers", [object()])
    spec = types.SimpleNamespace(runtime_api_address="127.0.0.1:9094", token="t", insecure=True,
                                 root_certificates_path=None)
    fc.run_clientapp_task(spec)
    assert exit_handler.registered_exit_handlers == []
    assert calls == [{"runtime_api_address": "127.0.0.1:9094", "token": "t", "insecure": True, "certificates": None,
                      "parent_pid": None, "runtime_dependency_install": False}]


def test_only_flowers_deployed_grid_counts_as_sleeping_between_pulls() -> None:
    import inspect

    from flwr.superlink.grid.http_grid import HttpGrid

    assert "time.sleep(3)" in inspect.getsource(HttpGrid.send_and_receive)  # what PromptGrid saves
    assert fc.sleeps_between_pulls(HttpGrid.__new__(HttpGrid))
    assert not fc.sleeps_between_pulls(NODES)
