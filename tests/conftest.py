"""Shared fixtures: a tiny exported model in a temporary BentoML store, and real `bentoml serve` processes.

    model_store   (session) BENTOML_HOME holding `cifar100-classifier` made from an untrained Part 1 model
                  (checkpoint.pt + model.onnx, exported with export.onnx / export.bento)
    model_dir     (session) that store entry's folder
    start_server  (module)  start_server(env={...}) -> "http://127.0.0.1:PORT", a real `bentoml serve` of
                  serving.service:Classifier, waited for /readyz, stopped when the module ends
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).parent / "bentoml")

# In a subprocess so that BENTOML_HOME is read fresh (bentoml caches its store location per process).
MAKE_STORE = """
import sys
from pathlib import Path
import torch
from training.checkpoint import checkpoint_state, load_classifier, save_checkpoint, sha256
from training.models import build_classifier
from training.recipes import Part1
from export.onnx import export_checkpoint
from export.bento import save_to_store

out = Path(sys.argv[1])
torch.manual_seed(0)
checkpoint = out / "part1.pt"
state = checkpoint_state(build_classifier(Part1()), Part1(), [f"class_{i}" for i in range(100)],
                         metrics={"epoch": 1, "val_acc": 0.5, "val_loss": 1.0, "test_acc": 0.5})
save_checkpoint(checkpoint, state)
model, ckpt = load_classifier(checkpoint)
export_checkpoint(model, ckpt, sha256(checkpoint), out, sizes=(1,))
print(save_to_store(checkpoint, out).path)
"""


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    """BENTOML_HOME (a Path) with one tiny `cifar100-classifier` model in its store."""
    root = tmp_path_factory.mktemp("bentoml")
    home, artifacts = root / "home", root / "artifacts"
    artifacts.mkdir()
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    done = subprocess.run([sys.executable, "-c", MAKE_STORE, str(artifacts)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return home


@pytest.fixture(scope="session")
def model_dir(model_store):
    """The store entry's folder: checkpoint.pt, model.onnx, model.yaml."""
    (path,) = (model_store / "models" / "cifar100-classifier").glob("*/model.yaml")
    return path.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BentoServer:
    """`bentoml serve serving.service:Classifier` in its own process group, on a free 127.0.0.1 port."""

    def __init__(self, bentoml_home, env=None, log_dir=None, ready_timeout=240):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        run_dir = Path(log_dir or bentoml_home) / f"serve-{self.port}"
        self.log_path = run_dir / "serve.log"
        # A BENTOML_HOME of its own that shares the model store: BentoML keeps its Prometheus files in
        # $BENTOML_HOME/prometheus_multiproc_dir and wipes them at start, so servers must not share one.
        home = run_dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "models").exists():
            (home / "models").symlink_to(Path(bentoml_home).resolve() / "models")
        full_env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
                    **{k: str(v) for k, v in (env or {}).items()}}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [BENTOML, "serve", "serving.service:Classifier", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(ready_timeout)

    def log_tail(self, n=4000):
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"bentoml serve not ready in {timeout} s:\n{self.log_tail()}")

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and the workers it started
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def start_server(model_store, tmp_path_factory):
    """start_server(env=None) -> base URL of a ready server; every server stops when the module ends."""
    servers = []

    def start(env=None):
        server = BentoServer(model_store, env, log_dir=tmp_path_factory.mktemp("serve"))
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()
