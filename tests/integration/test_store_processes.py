"""FilesystemStore writers in separate OS processes serialise on its flock (threads and notifications:
tests/unit/test_store_notify.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from adapters_store.filesystem import FilesystemStore

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_concurrent_processes_lose_no_activation(tmp_path: Path) -> None:
    """Writers in separate processes serialise on the flock: every activation lands in the history.

    The processes start their loops together (a "go" file), so without the flock read-modify-write
    races do lose entries (checked by hand: about a quarter of them).
    """
    script = ("import sys, time; from pathlib import Path; from adapters_store.filesystem import FilesystemStore\n"
              "root, n = Path(sys.argv[1]), int(sys.argv[2]); store = FilesystemStore(root, max_history=1000)\n"
              "print('ready', flush=True)\n"
              "while not (root / 'go').exists(): time.sleep(0.005)\n"
              "for i in range(30):\n"
              "    store.activate('t1', store.put('t1', b'{}', f'{n}-{i}'.encode()))\n")
    FilesystemStore(tmp_path).put("t1", b"{}", b"seed")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(n)], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True) for n in range(3)]
    assert [p.stdout.readline().strip() for p in procs if p.stdout] == ["ready"] * 3
    (tmp_path / "go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    state = json.loads((tmp_path / "t1" / "state.json").read_text())
    assert len([*state["history"], state["active"]]) == 90
    assert len(FilesystemStore(tmp_path).versions("t1")) == 91
