"""A Ray-free Flower simulation: a `Grid` that delivers each message by calling the ClientApp.

Flower 1.42's own simulation runs every ClientApp call through Ray (7-11 s start-up, ~2 GB),
which is far too heavy for tests and for sweeps on a laptop. `InProcessGrid` implements the
same `Grid` contract a real ServerApp talks to, but answers `send_and_receive` by calling the
`ClientApp` directly in this process, so an unmodified `ServerApp` (`@app.main()`, strategies
from `flwr.serverapp.strategy`) and an unmodified `ClientApp` (`@app.train()`,
`@app.evaluate()`) run together in one Python process.

What a real deployment does, and what is copied here (read from flwr 1.42's source):

- Node ids: the SuperLink is node `SUPERLINK_NODE_ID` (1); SuperNodes get other ids. Here node
  ``NODE_ID_OFFSET + i`` is partition ``i``, so ids are deterministic and reversible.
- Messages: the ClientApp receives its own copy of each instruction (in deployment it is
  deserialized), so a ClientApp mutating ``message.content`` cannot leak into other nodes or
  into the strategy (FedAvg sends the *same* RecordDict object to every node).
- Errors: an exception in the ClientApp becomes ``Message(Error(CLIENT_APP_RAISED_EXCEPTION,
  "<class ...>:<'...'>"), reply_to=message)``, exactly as `flwr-clientapp` builds it
  (`flwr/supernode/runtime/run_clientapp.py`); the strategy counts it as a failure.
- Replies get a fresh ``message_id``; their ``reply_to_message_id``, ``src_node_id``,
  ``dst_node_id``, ``run_id``, ``group_id`` and ``message_type`` come from
  ``Message(..., reply_to=...)``. A reply that does not answer its instruction (the SuperLink
  would silently drop it) is turned into an error reply instead, so the bug is visible.
- Context: per node only ``Context.state`` is kept between messages, created on the first
  message to that node; ``node_config`` and ``run_config`` are rebuilt per call. As in
  deployment, state changes made before an exception are kept (the SuperNode pushes the
  Context back on exit either way).
- Timeout: calls are synchronous, so ``timeout`` cannot interrupt one. A reply whose ClientApp
  call took longer than ``timeout`` seconds is dropped (logged), which is what the strategy
  would see in deployment: no reply from that node. The limit is per message, not for the
  whole batch, because a real federation runs the nodes in parallel.

Limitations: ClientApp code runs with the *server's* `TaskIdentity`, so a ClientApp that
builds a brand-new (non-reply) `Message` gets the SuperLink as its source; replies built with
``reply_to=`` (the normal case) are unaffected. Message TTLs are not enforced.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any
from uuid import uuid4

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict, UserConfig, UserConfigValue
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.cohort import run_together
from common.flower_compat import SUPERLINK_NODE_ID, ErrorCode, Run, make_run, server_task_identity, set_message_id
from simulation.allocator import keep_freed_memory

__all__ = [
    "NODE_ID_OFFSET",
    "InProcessGrid",
    "default_node_config",
    "run_in_process",
    "run_server_app",
]

log = logging.getLogger(__name__)

NODE_ID_OFFSET = 1_000_000
"""Node ``NODE_ID_OFFSET + i`` is partition ``i``; the offset keeps clear of the SuperLink (1)."""

DEFAULT_RUN_ID = 1
COHORT_SIZE = 128  # train messages handled together; client.training bounds the memory of each batch

NodeConfigFn = Callable[[int], UserConfig]
RunConfig = Mapping[str, UserConfigValue]


def default_node_config(num_nodes: int) -> NodeConfigFn:
    """Return the node_config Flower's simulation gives partition ``i``."""
    return lambda i: {"partition-id": i, "num-partitions": num_nodes}


# --- The Grid.


class InProcessGrid(Grid):
    """A `Grid` whose nodes are lazy, in-process calls to one `ClientApp`.

    Nothing is built per node up front: a node costs memory only once it has been sent a
    message, and then only its ``Context.state`` (a `RecordDict`) is kept. That keeps 20,000
    nodes cheap when a strategy samples a few per round.

    Parameters
    ----------
    client_app : the ClientApp every node runs.
    num_nodes : number of nodes; node ``NODE_ID_OFFSET + i`` is partition ``i``.
    run_config : the Flower run config, given to the ServerApp and to every ClientApp call.
    node_config_fn : maps a partition index to that node's ``node_config``; defaults to
        Flower's ``{"partition-id": i, "num-partitions": num_nodes}``.
    cohort_size : train messages are handled this many at a time, each ClientApp call in a
        thread of its own, and the local trainings they reach run as one batch
        (`client.cohort.run_together`); one node's messages stay in order on one thread. 1 calls
        the ClientApp one message at a time.
    run_id : the run id used in every Context and Message.
    """

    def __init__(  # all are plain settings
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: RunConfig,
        node_config_fn: NodeConfigFn | None = None,
        *,
        cohort_size: int = COHORT_SIZE,
        run_id: int = DEFAULT_RUN_ID,
    ) -> None:
        if num_nodes < 1 or cohort_size < 1:
            raise ValueError("num_nodes and cohort_size must be at least 1")
        self._client_app = client_app
        self._num_nodes = num_nodes
        self._run_config: UserConfig = dict(run_config)
        self._node_config_fn = node_config_fn or default_node_config(num_nodes)
        self._cohort_size = cohort_size
        self._states: dict[int, RecordDict] = {}  # node_id -> Context.state, lazily
        self._pending: dict[str, Message] = {}  # pushed, not yet delivered
        self._replies: dict[str, Message] = {}  # instruction id -> reply, not yet pulled
        self._run: Run | None = None
        self.set_run(make_run(run_id, self._run_config))

    # Node ids <-> partitions.

    def node_id_of(self, partition_id: int) -> int:
        """Node id of partition ``partition_id``."""
        if not 0 <= partition_id < self._num_nodes:
            raise ValueError(f"partition {partition_id} not in [0, {self._num_nodes})")
        return NODE_ID_OFFSET + partition_id

    def partition_id_of(self, node_id: int) -> int:
        """Partition index of node ``node_id``."""
        partition_id = node_id - NODE_ID_OFFSET
        if not 0 <= partition_id < self._num_nodes:
            raise ValueError(f"unknown node id {node_id}")
        return partition_id

    @property
    def node_states(self) -> Mapping[int, RecordDict]:
        """``Context.state`` of every node contacted so far (read-only view), by node id."""
        return MappingProxyType(self._states)

    def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The ConfigRecords of every node's state, as plain JSON-able data, for a checkpoint.

        Only ConfigRecords are kept (fedrec's clients store their privacy ledger in one);
        array and metric records in a node's state are not part of a snapshot.
        """
        return {str(node_id): {name: dict(record) for name, record in state.config_records.items()}
                for node_id, state in self._states.items()}

    def restore(self, snapshot: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
        """Give nodes back the state a `snapshot` took (a resumed run continues their ledgers)."""
        for node_id, records in snapshot.items():
            self._states[int(node_id)] = RecordDict({name: ConfigRecord(dict(r)) for name, r in records.items()})

    # The Grid contract.

    def set_run(self, run: Run) -> None:
        """Set the run this Grid operates in (done in ``__init__``; kept for the contract)."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        """A copy of the run information, as Flower's grids return it."""
        assert self._run is not None
        return Run(**vars(self._run))

    @property
    def _run_id(self) -> int:
        assert self._run is not None
        return self._run.run_id

    def create_message(  # signature fixed by Grid
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Deprecated in Flower (use the `Message` constructor); kept for the contract."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """All node ids, as a `range` so 20,000 nodes cost nothing until sampled."""
        return range(NODE_ID_OFFSET, NODE_ID_OFFSET + self._num_nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages and return their ids; invalid ones are logged and skipped.

        Mirrors the SuperLink, which refuses (and returns no id for) a message that is a
        reply, comes from another run or source, or is addressed to an unknown node.
        """
        ids: list[str] = []
        for message in messages:
            problem = self._instruction_problem(message)
            if problem:
                log.error("Message refused: %s", problem)
                continue
            message_id = str(uuid4())
            set_message_id(message, message_id)
            self._pending[message_id] = message
            ids.append(message_id)
        return ids

    def _instruction_problem(self, message: Message) -> str:
        """Why the SuperLink would refuse ``message``; '' if it would accept it."""
        meta = message.metadata
        if meta.reply_to_message_id:
            return "it is a reply, not an instruction"
        if meta.run_id != self._run_id:
            return f"run_id {meta.run_id} is not this run's ({self._run_id})"
        if meta.src_node_id != SUPERLINK_NODE_ID:
            return f"src_node_id {meta.src_node_id} is not the SuperLink's ({SUPERLINK_NODE_ID})"
        if not 0 <= meta.dst_node_id - NODE_ID_OFFSET < self._num_nodes:
            return f"dst_node_id {meta.dst_node_id} is not a node of this grid"
        if meta.ttl <= 0:
            return "ttl is not positive"
        return ""

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return (and forget) the replies to ``message_ids``, delivering any still queued."""
        message_ids = list(message_ids)
        self._deliver(message_ids, timeout=None)
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Deliver ``messages`` and yield the replies; see the module doc for ``timeout``.

        Lazily: each ClientApp call happens when the strategy asks for its reply, so a strategy
        that aggregates as replies arrive holds one client's weights at a time, not a round's.
        """
        message_ids = list(self.push_messages(messages))
        return self._replies_to(message_ids, timeout)

    def _replies_to(self, message_ids: list[str], timeout: float | None) -> Iterator[Message]:
        for batch in _batches(message_ids, self._cohort_size):
            self._deliver(batch, timeout=timeout)
            yield from (self._replies.pop(i) for i in batch if i in self._replies)

    # Delivery.

    def _deliver(self, message_ids: list[str], timeout: float | None) -> None:
        """Run the ClientApp on every queued message among ``message_ids``; store replies."""
        by_node: dict[int, list[Message]] = {}
        for message_id in message_ids:
            if (message := self._pending.pop(message_id, None)) is not None:
                by_node.setdefault(message.metadata.dst_node_id, []).append(message)
        if not by_node:
            return
        groups = list(by_node.values())
        if all(m.metadata.message_type == MessageType.TRAIN for group in groups for m in group):
            results = run_together([functools.partial(self._handle_node, group) for group in groups])
        else:
            results = [self._handle_node(group) for group in groups]
        for message, reply, seconds in (item for result in results for item in result):
            if timeout is not None and seconds > timeout:
                log.warning("Dropping reply from node %d: took %.2f s, timeout %.2f s",
                            message.metadata.dst_node_id, seconds, timeout)
                continue
            self._replies[message.metadata.message_id] = reply

    def _handle_node(self, messages: list[Message]) -> list[tuple[Message, Message, float]]:
        """Handle one node's messages in order: ``(instruction, reply, seconds)`` each."""
        return [(message, *self._call_client_app(message)) for message in messages]

    def _call_client_app(self, message: Message) -> tuple[Message, float]:
        """Call the ClientApp as a SuperNode would; never raises (errors become replies)."""
        node_id = message.metadata.dst_node_id
        context = Context(
            run_id=self._run_id,
            node_id=node_id,
            node_config=self._node_config_fn(self.partition_id_of(node_id)),
            state=self._states[node_id] if node_id in self._states else RecordDict(),
            run_config=dict(self._run_config),
        )
        started = time.perf_counter()
        try:
            reply = self._client_app(message=copy.deepcopy(message), context=context)
            problem = _reply_problem(message, reply)
            if problem:
                log.error("ClientApp on node %d returned a bad reply: %s", node_id, problem)
                reply = Message(Error(code=ErrorCode.UNKNOWN, reason=problem), reply_to=message)
        except Exception as ex:  # a failing node must not stop the round
            log.exception("ClientApp raised an exception on node %d", node_id)
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"  # same format as flwr-clientapp
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
            )
        seconds = time.perf_counter() - started
        self._states[node_id] = context.state
        set_message_id(reply, str(uuid4()))
        return reply, seconds


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    """`size` at a time: one cohort, then its replies go out."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _reply_problem(message: Message, reply: object) -> str:
    """Why ``reply`` is not a valid answer to ``message`` (the SuperLink's checks); or ''."""
    if not isinstance(reply, Message):
        return f"expected a Message, got {type(reply).__name__}"
    got, want = reply.metadata, message.metadata
    if got.reply_to_message_id != want.message_id:
        return "reply_to_message_id does not match; build replies with Message(..., reply_to=msg)"
    if got.src_node_id != want.dst_node_id or got.run_id != want.run_id:
        return "src_node_id/run_id do not match the instruction"
    return ""


# --- Running a ServerApp.


def run_server_app(server_app: ServerApp, grid: InProcessGrid) -> Context:
    """Run ``server_app`` against ``grid`` and return the ServerApp's final Context.

    Does what `flwr-serverapp` does before calling the app: a Context for the SuperLink node
    with the run config filled in (unlike ``run_simulation`` with in-memory apps, which leaves
    it empty), the `TaskIdentity` set, then ``server_app(grid=grid, context=context)``
    (`flwr.server.run_serverapp.run`). Exceptions from the ServerApp propagate.
    """
    keep_freed_memory()
    run = grid.run
    context = Context(
        run_id=run.run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run.override_config),
    )
    with server_task_identity(run.run_id):
        server_app(grid=grid, context=context)
    return context


def run_in_process(  # all are plain settings
    server_app: ServerApp,
    client_app: ClientApp,
    *,
    num_nodes: int,
    run_config: RunConfig,
    node_config_fn: NodeConfigFn | None = None,
    cohort_size: int = COHORT_SIZE,
    run_id: int = DEFAULT_RUN_ID,
) -> Context:
    """Run a ServerApp and a ClientApp together in this process; return the server Context."""
    grid = InProcessGrid(client_app, num_nodes, run_config, node_config_fn,
                         cohort_size=cohort_size, run_id=run_id)
    return run_server_app(server_app, grid)
