"""Shared fixtures: a tiny exported model in a temporary BentoML store, and real `bentoml serve` processes.

    model_store   (session) BENTOML_HOME holding `cifar100-classifier` made from an untrained Part 1 model
                  (checkpoint.pt + model.onnx, exported with export.onnx / export.bento)
    model_dir     (session) that store entry's folder
    start_server  (module)  start_server(env={...}) -> "http://127.0.0.1:PORT", a real `bentoml serve` of
                  serving.service:Classifier, waited for /readyz, stopped when the module ends
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.local_server import LocalServer

REPO = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="module")
def start_server(model_store, tmp_path_factory):
    """start_server(env=None) -> base URL of a ready server; every server stops when the module ends."""
    servers = []

    def start(env=None):
        server = LocalServer(model_store, env, run_dir=tmp_path_factory.mktemp("serve"))
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()
