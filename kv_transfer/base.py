"""The transport boundary: prefill hands a KVHandoff to a decode service and gets events back."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from kv_transfer.handoff import KVHandoff
from kv_transfer.outcome import ErrorKind, FinishReason, error_kind, refusal_message


@dataclass
class TokenEvent:
    """Output of one request, streamed from decode back to the front door."""

    request_id: str  # the request this belongs to
    token_ids: list[int]  # newly generated token ids since the previous event
    text: str  # newly stable text since the previous event
    finish_reason: FinishReason | None = None  # set on the last event
    error: str | None = None  # why the request failed, when finish_reason is ERROR
    error_kind: ErrorKind | None = None  # how it failed, when finish_reason is ERROR
    num_prompt_tokens: int = 0  # usage, on the last event
    num_output_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # e.g. queue_s, decode_s, on the last event
    first_token_index: int = 0  # output index of token_ids[0] (lets at-least-once receivers drop repeats)

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def failure(cls, request_id: str, kind: ErrorKind, message: str, num_prompt_tokens: int = 0) -> TokenEvent:
        """The last event of a request that failed: the one way every layer reports a failure."""
        return cls(request_id, [], "", FinishReason.ERROR, message, kind, num_prompt_tokens)

    @classmethod
    def refused(cls, request_id: str, e: BaseException) -> TokenEvent:
        """The failure event for a handoff that decode refused or could not take (raised as `e`)."""
        return cls.failure(request_id, error_kind(e), refusal_message(e))


EventSink = Callable[[TokenEvent], None]


def merge_events(events: list[TokenEvent]) -> TokenEvent:
    """Consecutive events of one request as one chunk: their tokens and text in order, and the last
    one's finish fields (a final event can only be last)."""
    if len(events) == 1:
        return events[0]
    return replace(events[-1], token_ids=[t for e in events for t in e.token_ids], text="".join(e.text for e in events),
                   first_token_index=events[0].first_token_index)


class DedupSink:
    """Passes each output token on exactly once, for transports that may replay a request.

    A decode replica that takes over a request replays it from its first output token; every event
    says at which output index its tokens start, so repeats are recognised and dropped. Replays are
    identical because decoding is deterministic (greedy, or seeded per output index).
    """

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self.num_delivered = 0
        self.is_finished = False

    def __call__(self, event: TokenEvent) -> None:
        if self.is_finished:
            return
        end = event.first_token_index + len(event.token_ids)
        if event.token_ids and end <= self.num_delivered and not event.is_final:
            return  # a replayed token
        skip = max(0, self.num_delivered - event.first_token_index) if event.token_ids else 0
        if skip:
            event.token_ids = event.token_ids[skip:]
            event.text = event.text if event.is_final else ""
        self.num_delivered = max(self.num_delivered, end)
        self.is_finished = event.is_final
        self.sink(event)


class KVStream(abc.ABC):
    """One handoff sent while prefill computes it: opened when the request's last pass starts,
    told as each layer of `handoff.kv` is filled, finished with the first token.

    Calls come from the prefill engine's thread in order: `layer_ready` for layers 0, 1, ... (each
    must return at once: the engine is between two layers of a forward pass), then exactly one of
    `finish` and `cancel`. Decode admits nothing before `finish`.
    """

    def __init__(self, handoff: KVHandoff, sink: EventSink) -> None:
        self.handoff = handoff  # its kv fills layer by layer; first_token_id is set by finish()
        self.sink = sink

    @abc.abstractmethod
    def layer_ready(self, layer: int) -> None:
        """handoff.kv[layer] holds its final values (and will not change)."""

    @abc.abstractmethod
    def finish(self, first_token_id: int) -> None:
        """Every layer is ready and output token 0 is sampled: complete the handoff. Raises as
        KVSender.send does when decode refuses it or cannot be reached."""

    @abc.abstractmethod
    def cancel(self, reason: str) -> None:
        """Prefill will not complete this handoff (its pass failed): decode drops what it received."""


class KVSender(abc.ABC):
    """Prefill side of a transport."""

    transport_name: str = "abstract"  # metrics label: inproc | grpc | redis

    @abc.abstractmethod
    def send(self, handoff: KVHandoff, sink: EventSink) -> None:
        """Hand the KV over; events for the request arrive on `sink` (from any thread)."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """The client went away: decode frees the request's slot at its next step."""

    def open_stream(self, handoff: KVHandoff, sink: EventSink) -> KVStream | None:
        """A stream that sends `handoff` layer by layer as prefill computes it (see KVStream), or None when
        this transport hands the KV over whole, after the pass (then `send` is called)."""
        return None

    def is_ready(self) -> tuple[bool, str]:
        """Whether the decode side is reachable, with a reason when not."""
        return True, "ok"

    def wire_bytes(self, handoff: KVHandoff) -> int:
        """KV bytes this transport moves for the handoff (in-process: the tensor's own size)."""
        return handoff.kv.numel() * handoff.kv.element_size()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class DecodeBackend(abc.ABC):
    """Decode side: what a receiver delivers handoffs to."""

    @abc.abstractmethod
    def submit(self, handoff: KVHandoff, sink: EventSink) -> None:
        """Admit (or queue) the handoff; raise HandoffError / QueueFullError to refuse it."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Abort the request if it is queued or running."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """At least num_running, num_waiting and max_waiting (receivers pace themselves with it)."""

    def liveness(self) -> str | None:
        """None while the backend works; otherwise why not (receivers then take no new work)."""
        return None
