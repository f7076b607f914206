"""Adapter storage: where tasks' adapter bytes live. Runs no models."""
