"""Prefill: the HTTP front door, adapted multi-task prefill batching, and relaying decode's tokens."""
