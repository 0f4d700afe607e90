"""Measured communication: the bytes Flower 1.42 serializes for a message.

Flower 1.42 moves a message as content-addressed objects: the ``Message``
(metadata and error, protobuf), its ``RecordDict`` (the names and object ids of
its records) and every record (``ConfigRecord``/``MetricRecord`` protobuf), each
with Flower's object header. Two counts, both from the objects' ``deflate()``:

* :func:`payload_nbytes` -- the records: what the ESSAM protocol puts on the
  wire (seeds, coefficients, scalars, with protobuf framing, key names and
  Flower's record header). This is the number reported as bytes per client and round.
* :func:`message_nbytes` -- everything Flower serializes for the message:
  the payload plus the envelope (message metadata, about 130 bytes, and the
  RecordDict of record references, about 160 bytes), whatever the content.
"""

from __future__ import annotations

from flwr.app import Message


def payload_nbytes(message: Message) -> int:
    """Serialized bytes of the message's records (0 without content)."""
    if not message.has_content():
        return 0
    return sum(len(record.deflate()) for record in message.content.values())


def message_nbytes(message: Message) -> int:
    """Serialized bytes of the whole message: envelope, ``RecordDict`` and records."""
    envelope = len(message.deflate())
    if not message.has_content():
        return envelope
    return envelope + len(message.content.deflate()) + payload_nbytes(message)


__all__ = ["message_nbytes", "payload_nbytes"]
