"""The `prad adapters push|activate|rollback|list|show|split` commands: thin clients of the /admin API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx


def run_admin(args: argparse.Namespace, action: str) -> int:
    if not args.token:
        print("prad: error: --token (or PRAD_ADMIN_TOKEN) is required", file=sys.stderr)
        return 2
    base = args.server.rstrip("/") + "/admin/adapters"
    headers = {"Authorization": f"Bearer {args.token}"}
    with httpx.Client(headers=headers, timeout=120) as client:
        if action == "push":
            folder = Path(args.dir)
            files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
                     "weights": ("adapter.safetensors", (folder / "adapter.safetensors").read_bytes())}
            r = client.post(f"{base}/{args.task}/versions", files=files,
                            data={"activate": "true" if args.activate else "false"})
        elif action == "activate":
            r = client.post(f"{base}/{args.task}/activate", json={"version": args.version})
        elif action == "rollback":
            r = client.post(f"{base}/{args.task}/rollback")
        elif action == "show":
            r = client.get(f"{base}/{args.task}")
        elif action == "split" and args.end:
            r = client.delete(f"{base}/{args.task}/split")
        elif action == "split":
            try:
                weights = parse_weights(args.weights)
            except ValueError as e:
                print(f"prad: error: {e}", file=sys.stderr)
                return 2
            r = client.put(f"{base}/{args.task}/split", json={"weights": weights})
        else:
            r = client.get(base)
    if r.status_code >= 400:
        print(f"prad: error: {r.status_code}: {r.json().get('detail', r.text)}", file=sys.stderr)
        return 1
    body = r.json()
    out = {"task": body["task"], "version": body["version"]} if action == "push" else body
    print(json.dumps(out))
    return 0


def parse_weights(pairs: list[str]) -> dict[str, int]:
    """["V7=90", "V8=10"] -> {"V7": 90, "V8": 10}; ValueError naming a malformed pair (the server checks
    the rest: versions exist, at least two, summing to 100)."""
    weights: dict[str, int] = {}
    for pair in pairs:
        version, sep, percent = pair.partition("=")
        if not sep or not version or not percent.strip().isdigit():
            raise ValueError(f"expected VERSION=PERCENT, got {pair!r}")
        if version in weights:
            raise ValueError(f"version {version!r} given twice")
        weights[version] = int(percent)
    if not weights:
        raise ValueError("give VERSION=PERCENT pairs, or --end")
    return weights
