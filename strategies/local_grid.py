"""An in-process Grid: the ServerApp's strategy talks to ClientApp handlers without Ray.

:class:`LocalGrid` implements Flower's :class:`~flwr.serverapp.Grid` interface
synchronously: every pushed message is handled at once by the ClientApp (any
``(Message, Context) -> Message`` callable) with the destination node's own
:class:`~flwr.app.Context` (``partition-id``, ``num-partitions``, a persistent
``state``). An exception in the handler becomes an error reply, as in Flower's
runtimes; nodes listed in :attr:`offline` never answer (a timeout).

It runs the same strategy and client code as a simulation, deterministically
and in one process, for the equivalence tests and the ``federation.backend=local``
runs (fast on small machines; no Ray, no worker processes).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

Handler = Callable[[Message, Context], Message]

#: node id of the first client (Flower's simulation uses random 64-bit ids; any int works).
FIRST_NODE_ID = 1001


def ensure_task_identity(run_id: int = 1) -> None:
    """Give this process a Flower task identity if it has none (``Message(...)`` needs one)."""
    try:
        TaskIdentity.run_id
    except RuntimeError:
        TaskIdentity.run_id = run_id
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 0


class LocalGrid(Grid):
    """Synchronous in-process Grid over ``num_nodes`` nodes.

    Parameters
    ----------
    handler : callable
        The ClientApp (or any ``(Message, Context) -> Message``).
    num_nodes : int
    run_config : dict, optional
        The nodes' ``context.run_config``.
    """

    def __init__(self, handler: Handler, num_nodes: int, run_config: dict | None = None, run_id: int = 1) -> None:
        ensure_task_identity(run_id)
        self.handler = handler
        self.node_ids = [FIRST_NODE_ID + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(run_id=run_id, node_id=node,
                          node_config={"partition-id": i, "num-partitions": num_nodes},
                          state=RecordDict(), run_config=dict(run_config or {}))
            for i, node in enumerate(self.node_ids)
        }
        self.offline: set[int] = set()
        self.sent: list[Message] = []
        self._run = Run.create_empty(run_id=run_id)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        """Set the run."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A new message (as ``Message(...)``)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """All node ids (offline ones included: they are connected but do not answer)."""
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Handle every message now; keep the replies for :meth:`pull_messages`."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(message.metadata.message_id)
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if node in self.offline:
                continue
            try:
                reply = self.handler(message, self.contexts[node])
            except Exception as err:  # pylint: disable=broad-exception-caught
                reason = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            self._replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that exist (each returned once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push and pull at once (offline nodes simply do not answer)."""
        return self.pull_messages(self.push_messages(messages))


__all__ = ["FIRST_NODE_ID", "LocalGrid", "ensure_task_identity"]
