"""Adapter-free decode: continuous batching of every task's requests over the base model only.

This package must never import adapter code (prad.adapters, adapters_store); a test checks it.
"""
