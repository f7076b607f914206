"""Errors shared across services (no torch, so pure-logic modules can raise them)."""


class QueueFullError(RuntimeError):
    """A bounded queue is full; the front door answers 429."""
