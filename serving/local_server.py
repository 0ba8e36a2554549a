"""`bentoml serve serving.service:Classifier` as a child process on a loopback port: for tests and benchmarks.

    with LocalServer(bentoml_home, env={"CIFAR100_BACKEND": "torch"}) as server:
        requests.get(server.url + "/info")
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_label(proc):
    """A server process by name: 'arbiter (bentoml serve)', else the service its BentoML worker runs."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return f"pid{proc.pid}"
    if "serve" in cmd and any(c.endswith("bentoml") for c in cmd):
        return "arbiter (bentoml serve)"
    for flag in ("--service-name", "--runner-name"):
        if flag in cmd and cmd.index(flag) + 1 < len(cmd):
            return cmd[cmd.index(flag) + 1]
    return " ".join(Path(c).name for c in cmd[:3])[:40]


class LocalServer:
    """The service on 127.0.0.1 in its own process group, serving the store of BENTOML_HOME; waited for /readyz.
    RUN_DIR gets serve.log and server.pgid (the group to stop, for a shell trap if this process is killed)."""

    def __init__(self, bentoml_home, env=None, run_dir=None, port=None, ready_timeout=240):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        run_dir = Path(run_dir or Path(bentoml_home) / f"serve-{self.port}")
        self.log_path = run_dir / "serve.log"
        # A BENTOML_HOME of its own that shares the model store: BentoML keeps its Prometheus files in
        # $BENTOML_HOME/prometheus_multiproc_dir and wipes them at start, so servers must not share one.
        home = run_dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "models").exists():
            (home / "models").symlink_to(Path(bentoml_home).resolve() / "models")
        # A token in the caller's shell is not inherited: tests and benchmarks set one explicitly when they want one.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR100_API_TOKEN")}
        full_env = {**inherited, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
                    **{k: str(v) for k, v in (env or {}).items()}}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(   # `python -m bentoml`: also where bentoml is on PYTHONPATH only
                [sys.executable, "-m", "bentoml", "serve", "serving.service:Classifier", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pgid_file = run_dir / "server.pgid"
        self.pgid_file.write_text(str(self.process.pid))
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n=4000):
        return self.log_path.read_text(errors="replace")[-n:]

    def ready(self):
        try:
            return requests.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited ({self.process.returncode}):\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"bentoml serve not ready in {timeout} s:\n{self.log_tail()}")

    def stop(self):
        """The server and the workers it started (also those a dead server left behind)."""
        stop_process_group(self.process.pid, grace=20, leader=self.process)
        self.pgid_file.unlink(missing_ok=True)


def stop_process_group(pgid, grace=20.0, leader=None):
    """SIGTERM the process group, SIGKILL what is left after `grace` seconds (only groups we started).
    `leader`, our Popen of the group's first process, is reaped as we go (a zombie still counts as a member)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if leader is not None:
                leader.poll()
            os.killpg(pgid, 0)   # ProcessLookupError once every member is gone
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if leader is not None:
        leader.wait()
