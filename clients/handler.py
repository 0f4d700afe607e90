"""Flower side of the client: Message in, Message out (see :mod:`clients.client` for the work).

The handler reads the node's partition from ``context.node_config``
(``partition-id``, ``num-partitions``; on a deployed site also ``data-path``, the
site's own GSM8K-format JSONL file, which then is the node's whole share), keeps the node's update log in
``context.state`` (a ``ConfigRecord`` named :data:`~clients.client.LOG_KEY`),
and answers with one ``MetricRecord`` (:class:`~fed_essam.protocol.ProbeReply`).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from omegaconf import DictConfig

from fed_essam.protocol import RECORD_KEY, ProbeRequest, ProtocolError

from clients.client import LOG_KEY, read_log, run_request, write_log

#: node-config key of a site's own data file (``flower-supernode --node-config "data-path='/data/site.jsonl'"``).
DATA_PATH_KEY = "data-path"


def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of the node (``(0, 1)`` when unset, e.g. a lone deployed node)."""
    config = context.node_config
    return int(config.get("partition-id", 0)), int(config.get("num-partitions", 1))


def node_data_path(context: Context) -> str | None:
    """The node's own data file (``data-path`` in the node config), or ``None`` (use the run's partition)."""
    value = context.node_config.get(DATA_PATH_KEY)
    return str(value) if value not in (None, "") else None


def handle(message: Message, context: Context, cfg: DictConfig) -> Message:
    """Serve one probe request of the ESSAM protocol.

    Parameters
    ----------
    message : Message
        ``train.ascent`` or ``train.descent``, content ``{"essam": ConfigRecord}``.
    context : Context
        The node's context; its ``state`` holds the node's update log.
    cfg : DictConfig
        The run configuration (model, task, method, federation, privacy).

    Returns
    -------
    Message
        Reply with content ``{"essam": MetricRecord}``.
    """
    if RECORD_KEY not in message.content.config_records:
        raise ProtocolError(f"message {message.metadata.message_type!r} carries no {RECORD_KEY!r} ConfigRecord")
    kind = cfg.method.noise
    request = ProbeRequest.from_dict(message.content.config_records[RECORD_KEY], kind)
    stored = context.state.config_records.get(LOG_KEY)
    log = read_log(dict(stored) if stored is not None else None, kind)
    partition_id, num_partitions = node_partition(context)
    reply, log = run_request(cfg, request, log, partition_id, num_partitions, data_path=node_data_path(context))
    context.state[LOG_KEY] = ConfigRecord(write_log(log))
    return Message(RecordDict({RECORD_KEY: MetricRecord(reply.to_dict())}), reply_to=message)


__all__ = ["DATA_PATH_KEY", "handle", "node_data_path", "node_partition"]
