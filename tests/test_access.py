"""Who may call the service: a real `bentoml serve` with an API token (from a file, as a mounted secret), its
clients with and without the token, and the token settings themselves. Without a token the other test modules
show the service as it always was."""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from serving import access
from serving.access import AccessError, api_token, refusal
from serving.up import parse_args
from training.contract import blank_images, npy_bytes

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    secret = tmp_path_factory.mktemp("secret") / "token"
    secret.write_text(TOKEN + "\n")   # as a mounted secret often ends: with a newline
    return start_server({"CIFAR100_API_TOKEN_FILE": str(secret), "CIFAR100_MAX_BODY_MB": 1})


def npy(n=2):
    return npy_bytes(blank_images(n))


def with_token(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def model_calls(url):
    return requests.get(f"{url}/info", headers=with_token(), timeout=10).json()["stats"]["model_calls"]


BAD_HEADERS = {"none": {}, "wrong token": with_token("guess"), "not bearer": {"Authorization": f"Basic {TOKEN}"},
               "empty bearer": {"Authorization": "Bearer "}, "no scheme": {"Authorization": TOKEN}}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_requests_without_the_right_token_get_401_and_reach_no_model(server, case):
    before = model_calls(server)
    for method, path, kwargs in (("POST", "/classify_batch", {"files": {"images": ("x.npy", npy())}}),
                                 ("POST", "/classify", {"files": {"images": ("x.png", b"png")}}),
                                 ("POST", "/classify", {"data": b"png", "headers": {"Content-Type": "image/png"}}),
                                 ("POST", "/classify_batch", {"data": npy(),
                                                              "headers": {"Content-Type": "application/x-npy"}}),
                                 ("GET", "/info", {}), ("GET", "/metrics", {})):
        kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}), **BAD_HEADERS[case]}}
        response = requests.request(method, server + path, timeout=10, **kwargs)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "token" in response.json()["error"] and TOKEN not in response.text
    assert model_calls(server) == before


def test_the_token_is_checked_before_the_body_is_read(server):
    big = os.urandom(3 * 2**20)   # over the 1 MB limit: with a token this is a 413
    response = requests.post(f"{server}/classify", files={"images": ("big.png", big)}, timeout=30)
    assert response.status_code == 401
    response = requests.post(f"{server}/classify", files={"images": ("big.png", big)}, headers=with_token(), timeout=30)
    assert response.status_code == 413


def test_the_right_token_works_everywhere_and_probes_need_none(server):
    headers = with_token()
    assert requests.post(f"{server}/classify_batch", files={"images": ("x.npy", npy(3))}, headers=headers,
                         timeout=30).json()["class_ids"].__len__() == 3
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buffer, "PNG")
    assert len(requests.post(f"{server}/classify", files={"images": ("a.png", buffer.getvalue())}, headers=headers,
                             timeout=30).json()["predictions"]) == 1
    assert requests.get(f"{server}/info", headers=headers, timeout=10).json()["model"]
    assert "bentoml_service" in requests.get(f"{server}/metrics", headers=headers, timeout=10).text
    for path in ("/livez", "/readyz", "/healthz", "/docs.json", "/"):
        assert requests.get(server + path, timeout=10).status_code == 200, path


def test_the_scoring_client_passes_the_token_and_says_so_once_when_refused(server, tmp_path):
    ood = tmp_path / "ood"
    ood.mkdir()
    for k in range(19):
        np.save(ood / f"distortion{k:02d}.npy", np.zeros((5, 32, 32, 3), np.uint8))

    def score(env):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR100_API_TOKEN")}
        return subprocess.run([sys.executable, "-m", "serving.score", "--url", server, "--ood-dir", str(ood),
                               "--out", str(tmp_path / "s.csv")], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**clean, **env})

    refused = score({})
    assert refused.returncode == 1 and "retry" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: {server} refused the request (HTTP 401: this service needs a token: send the header "
        "Authorization: Bearer <token>): set CIFAR100_API_TOKEN (or CIFAR100_API_TOKEN_FILE) to its token"]
    wrong = score({"CIFAR100_API_TOKEN": "guess"})
    assert wrong.returncode == 1 and "is CIFAR100_API_TOKEN the service's token?" in wrong.stderr
    done = score({"CIFAR100_API_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 1 + 19 * 5


def test_locust_passes_the_token(server, tmp_path):
    def loadtest(env):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR100_API_TOKEN")}
        return subprocess.run([sys.executable, "-m", "loadtest", "--host", server, "--users", "2", "--run-time", "3s",
                               "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=180,
                              env={**clean, **env})
    refused = loadtest({})
    assert refused.returncode == 1 and "wants a token (HTTP 401)" in refused.stderr
    done = loadtest({"CIFAR100_API_TOKEN": TOKEN})
    assert done.returncode == 0, done.stdout + done.stderr


def test_token_settings(tmp_path):
    assert api_token({}) is None
    assert api_token({"CIFAR100_API_TOKEN": " abc "}) == "abc"
    (tmp_path / "t").write_text("from-file\n")
    assert api_token({"CIFAR100_API_TOKEN_FILE": str(tmp_path / "t")}) == "from-file"
    for env, message in (({"CIFAR100_API_TOKEN": " "}, "empty"),
                         ({"CIFAR100_API_TOKEN_FILE": str(tmp_path / "missing")}, "cannot read it"),
                         ({"CIFAR100_API_TOKEN": "a", "CIFAR100_API_TOKEN_FILE": str(tmp_path / "t")}, "not both")):
        with pytest.raises(AccessError, match=message):
            api_token(env)
    assert refusal(b"Bearer abc", "abc") is None and refusal(b"bearer  abc ", "abc") is None
    assert "not valid" in refusal(b"Bearer abd", "abc")
    assert access.open_path("/readyz") and access.open_path("/static_content/x.js") and not access.open_path("/metrics")


def test_the_main_job_listens_on_this_machine_only_by_default():
    assert parse_args([]).host == "127.0.0.1"
    assert parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"
