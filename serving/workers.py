"""What each model worker tells the front: ready or not, its device, its call statistics.

A call from the front reaches whichever worker holds the connection it uses, so neither readiness nor statistics
can be learned from one call. Each worker writes its state (a small JSON file, atomically) into a folder that the
processes of one `bentoml serve` share: named after their common parent, the server's arbiter, and owner-only.
"""
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil

from training.files import write_json

WRITE_EVERY_S = 1.0   # a worker's statistics reach the front at most this late


def state_dir():
    """The folder of this server's workers (made by the first of them; the last one out removes it)."""
    return Path(tempfile.gettempdir()) / f"cifar100-serve-{os.getppid()}"


def socket_path(index):
    """Where model worker INDEX listens for the front's model calls (serving/channel.py)."""
    return state_dir() / f"model-{index}.sock"


class WorkerState:
    """This worker's file: written at once when forced (ready, asked for), else by a background thread at most
    every WRITE_EVERY_S while its statistics change."""

    def __init__(self, index, device):
        state_dir().mkdir(mode=0o700, exist_ok=True)
        self.path = state_dir() / f"worker-{index}.json"
        self.state = {"worker": index, "pid": os.getpid(), "device": device, "ready": False}
        self.lock, self.changed, self.removed = threading.Lock(), threading.Event(), False
        self.path.unlink(missing_ok=True)   # a worker that restarts is not ready until it says so again
        threading.Thread(target=self._flush, daemon=True, name="worker-state").start()

    def update(self, force=False, **facts):
        with self.lock:
            self.state.update(facts)
            if force and not self.removed:
                write_json(self.path, self.state)
            else:
                self.changed.set()

    def _flush(self):
        while True:
            self.changed.wait()
            time.sleep(WRITE_EVERY_S)
            with self.lock:
                self.changed.clear()
                if not self.removed:
                    write_json(self.path, self.state)

    def remove(self):
        """At shutdown: this worker's file goes, and the folder with it when no other worker's is left."""
        with self.lock:
            self.removed = True
            self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()
        except OSError:   # not empty: another worker still runs (or its socket is still there)
            pass


def read_all():
    """Every worker's last state, by worker number (unreadable files, mid-rename on another OS, are skipped)."""
    states = []
    for path in sorted(state_dir().glob("worker-*.json")):
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(states, key=lambda s: s["worker"])


def listed(info):
    """How many model workers a GET /info answer lists: 1 where it lists none (the one-process layout)."""
    return len(info.get("workers") or []) or 1


def all_ready(states, expected):
    """Whether EXPECTED workers have said they are ready and still run (a killed worker's file says ready until
    its successor replaces it)."""
    return sum(1 for s in states if s.get("ready") and running(s["pid"])) >= expected


def running(pid):
    """Whether process PID runs: not gone, and not a zombie its parent has yet to reap."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def total_stats(states):
    """The call statistics of all workers together."""
    stats = [s.get("stats", {}) for s in states]
    return {"model_calls": sum(s.get("model_calls", 0) for s in stats), "images": sum(s.get("images", 0) for s in stats),
            "largest_call": max((s.get("largest_call", 0) for s in stats), default=0),
            "seconds": sum(s.get("seconds", 0.0) for s in stats)}
