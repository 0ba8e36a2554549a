"""Shared fixtures: a tiny exported model in a temporary BentoML store, and real `bentoml serve` processes.

    model_store   (session) BENTOML_HOME holding one model made from a random-weight Part 1 model
                  (checkpoint.pt + model.onnx, exported with export.onnx / export.bento)
    model_dir     (session) that store entry's folder
    start_server  (module)  start_server(env={...}) -> "http://127.0.0.1:PORT", a real `bentoml serve` of
                  serving.service:Classifier, waited for /readyz, stopped when the module ends
    onnx_server   (session) the URL of one such server on ONNX Runtime with the default settings, shared by the
                  modules that need nothing else (each start costs ~10 s of the suite)
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.local_server import LocalServer
from training.contract import MODEL_NAME

REPO = Path(__file__).resolve().parents[1]

# In a subprocess so that BENTOML_HOME is read fresh (bentoml caches its store location per process). The ONNX
# check runs on one batch of 1 and no FP16 file is made: a fixture, not a test of the export.
MAKE_STORE = """
import sys
from pathlib import Path
from export.onnx import export_checkpoint
from export.bento import save_to_store
from training.checkpoint import load_classifier, save_random_checkpoint, sha256

out = Path(sys.argv[1])
checkpoint = save_random_checkpoint(out / "part1.pt", "part1")
(model, ckpt), digest = load_classifier(checkpoint), sha256(checkpoint)
written = export_checkpoint(model, ckpt, digest, out, sizes=(1,))
print(save_to_store(checkpoint, ckpt, digest, written.values()).path)
"""


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    """BENTOML_HOME (a Path) with one tiny model in its store."""
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
    (path,) = (model_store / "models" / MODEL_NAME).glob("*/model.yaml")
    return path.parent


@pytest.fixture(scope="session")
def onnx_server(model_store, tmp_path_factory):
    with LocalServer(model_store, {"CIFAR100_BACKEND": "onnx"}, run_dir=tmp_path_factory.mktemp("serve")) as server:
        yield server.url


@pytest.fixture(scope="module")
def start_server(model_store, tmp_path_factory):
    """start_server(env=None) -> base URL of a ready server; every server stops when the module ends.
    start_server.log(url) is that server's log so far."""
    servers = {}

    def start(env=None):
        server = LocalServer(model_store, env, run_dir=tmp_path_factory.mktemp("serve"))
        servers[server.url] = server
        return server.url

    start.log = lambda url: servers[url].log_path.read_text(errors="replace")
    yield start
    for server in servers.values():
        server.stop()
