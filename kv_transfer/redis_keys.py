"""Key names of the Redis transport; every key of one deployment starts with its prefix."""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "prad-decode"  # the consumer group all decode replicas join

# What XREAD / XREADGROUP answer (redis-py types replies loosely): [(stream key, [(entry id, fields)])]
StreamEntry = tuple[bytes, dict[bytes, bytes]]
StreamReply = list[tuple[bytes | str, list[StreamEntry]]]


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "prad:"

    @property
    def jobs(self) -> str:
        """Stream of handoff headers, consumed by the decode group."""
        return f"{self.prefix}jobs"

    @property
    def aborts(self) -> str:
        """Pub/sub channel of aborted request ids."""
        return f"{self.prefix}aborts"

    def kv(self, request_id: str) -> str:
        """The KV blob of one request (TTL'd)."""
        return f"{self.prefix}kv:{request_id}"

    def kv_layers(self, request_id: str) -> str:
        """Stream of one request's KV sent layer by layer (format version 4): `kv` entries, then a `trailer`."""
        return f"{self.prefix}kvl:{request_id}"

    def tokens(self, request_id: str) -> str:
        """Stream of token events back to the prefill node that owns the request."""
        return f"{self.prefix}tokens:{request_id}"

    def wake(self, sender_id: str) -> str:
        """A sender's private stream, written to interrupt its blocking read when requests are added."""
        return f"{self.prefix}wake:{sender_id}"

    def alive(self, replica: str) -> str:
        """Heartbeat key of a decode replica (expires when it stops beating)."""
        return f"{self.prefix}decode-alive:{replica}"

    @property
    def replicas(self) -> str:
        """Set of the names of the decode replicas consuming the jobs stream; a name counts as alive
        while its `alive` key exists (senders look replicas up here instead of scanning the keyspace)."""
        return f"{self.prefix}jobs:replicas"
