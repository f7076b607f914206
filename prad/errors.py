"""Errors shared across services (no torch, so pure-logic modules can raise them)."""


class QueueFullError(RuntimeError):
    """A bounded queue is full; the front door answers 429."""


class EngineUnavailableError(RuntimeError):
    """An engine's loop has stopped (see prad/engine_loop.py); the front door answers 503."""
