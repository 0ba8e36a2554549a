"""The BentoML service over HTTP: a real `bentoml serve` (ONNX Runtime CPU, and PyTorch CPU) on 127.0.0.1."""
import concurrent.futures
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import bentoml
import numpy as np
import pytest
import requests
import torch
from PIL import Image

from loadtest import report
from serving.answers import BatchAnswer, ClassifyAnswer, InfoAnswer
from serving.images import INLINE_IMAGES, quick_to_decode, to_rgb
from training.checkpoint import load_classifier

LIMITS = {"CIFAR100_MAX_IMAGES": 64, "CIFAR100_MAX_BODY_MB": 1, "CIFAR100_MAX_PIXELS": 1_000_000}
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(LIMITS)  # CIFAR100_BACKEND unset: auto, the faster of ONNX Runtime and PyTorch here


@pytest.fixture(scope="module")
def torch_server(start_server):
    # A small model-call limit: the 64-image requests below are split by BentoML's batcher and reassembled.
    return start_server({**LIMITS, "CIFAR100_BACKEND": "torch", "CIFAR100_MAX_BATCH_SIZE": 8})


@pytest.fixture(scope="module")
def one_process_server(start_server):
    return start_server({**LIMITS, "CIFAR100_PROCESSES": 1})   # the front runs the model itself


@pytest.fixture(scope="module")
def direct(model_dir):
    model, _ = load_classifier(model_dir / "checkpoint.pt")

    def logits(images):
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(images))).numpy()
    return logits


def npy(array, **kw):
    buffer = io.BytesIO()
    np.save(buffer, array, **kw)
    return buffer.getvalue()


def softmax(x):
    z = np.exp(x - x.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def image_bytes(image, fmt, **kw):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def classify_batch(url, array, **data):
    return requests.post(f"{url}/classify_batch", files={"images": ("x.npy", npy(array))}, data=data, timeout=60)


def assert_alive(url):
    assert requests.get(f"{url}/livez", timeout=10).status_code == 200
    response = classify_batch(url, np.zeros((1, 32, 32, 3), np.uint8))
    assert response.status_code == 200 and len(response.json()["class_ids"]) == 1


# ---- endpoints -----------------------------------------------------------------------------------------

def test_info_and_probes(server):
    info = requests.get(f"{server}/info", timeout=10).json()
    InfoAnswer.model_validate(info)   # what the OpenAPI document promises
    assert info["model"].startswith("cifar100-classifier:")
    assert (info["device"], info["precision"]) == ("cpu", "fp32")
    speed = info["auto"]["img_per_s"]   # CIFAR100_BACKEND unset: auto timed both CPU backends, serves the faster
    assert set(speed) == {"torch", "onnx"} and info["backend"] == max(speed, key=speed.get)
    assert info["metadata"]["arch"] == "simple_cnn" and len(info["metadata"]["classes"]) == 100
    assert info["batching"]["max_images_per_request"] == 64 and info["batching"]["max_batch_size"] == 1024
    assert requests.get(f"{server}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{server}/livez", timeout=10).status_code == 200
    assert "cifar100_requests_per_model_call" in requests.get(f"{server}/metrics", timeout=10).text


@pytest.mark.parametrize("which", ["server", "torch_server", "one_process_server"])
def test_classify_batch_matches_the_model(request, which, direct):
    url = request.getfixturevalue(which)
    images = RNG.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    expected = direct(images)
    body = classify_batch(url, images, probabilities="true").json()
    BatchAnswer.model_validate(body)
    assert body["class_ids"] == expected.argmax(1).tolist()
    np.testing.assert_allclose(body["probabilities"], softmax(expected), atol=1e-5)
    assert set(classify_batch(url, images[:3]).json()) == {"class_ids"}  # probabilities only on request
    info = requests.get(f"{url}/info", timeout=10).json()
    if which == "torch_server":
        assert info["backend"] == "torch" and info["stats"]["largest_call"] == 8
    assert info["batching"]["processes"] == (1 if which == "one_process_server" else 2)


@pytest.mark.parametrize("which", ["server", "one_process_server"])
@pytest.mark.parametrize("content_type", ["application/x-npy", "application/octet-stream"])
def test_raw_npy_body_answers_as_the_upload_does(request, which, content_type, direct):
    url = request.getfixturevalue(which)
    images = RNG.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    raw = requests.post(f"{url}/classify_batch?probabilities=true", data=npy(images),
                        headers={"Content-Type": content_type}, timeout=60).json()
    assert raw == classify_batch(url, images, probabilities="true").json()
    assert raw["class_ids"] == direct(images).argmax(1).tolist()
    without = requests.post(f"{url}/classify_batch?probabilities=no", data=npy(images),
                            headers={"Content-Type": content_type}, timeout=60).json()
    assert without == {"class_ids": raw["class_ids"]}
    unclear = requests.post(f"{url}/classify_batch?probabilities=maybe", data=npy(images),
                            headers={"Content-Type": content_type}, timeout=60)
    assert unclear.status_code == 400 and "probabilities" in unclear.json()["error"]
    bad = requests.post(f"{url}/classify_batch", data=npy(np.zeros((2, 3, 32, 32), np.uint8)),
                        headers={"Content-Type": content_type}, timeout=60)
    assert bad.status_code == 422 and "(2, 3, 32, 32)" in bad.json()["error"]
    too_many = requests.post(f"{url}/classify_batch", data=npy(np.zeros((65, 32, 32, 3), np.uint8)),
                             headers={"Content-Type": content_type}, timeout=60)
    assert too_many.status_code == 413 and "CIFAR100_MAX_IMAGES" in too_many.json()["error"]


def test_concurrent_requests_merge_in_the_one_process_layout(one_process_server, direct):
    batches = [RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for _ in range(48)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda b: classify_batch(one_process_server, b), batches))
    for images, response in zip(batches, results):
        assert response.json()["class_ids"] == direct(images).argmax(1).tolist()
    assert requests.get(f"{one_process_server}/info", timeout=10).json()["stats"]["largest_call"] > 2


def test_metrics_count_the_model_calls_in_the_one_process_layout(one_process_server):
    """The front runs the model: its series (worker "1", the front's number) grow by exactly what was sent, and
    agree with /info's statistics, counted apart in the same process."""
    def counts():
        return report.worker_counts(requests.get(f"{one_process_server}/metrics", timeout=10).text)
    before, sizes = counts(), [1, 5, 64, 3]
    for n in sizes:   # one after another: one model call each
        assert classify_batch(one_process_server, RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)).ok
    after = counts()
    assert list(after) == ["1"]
    assert (after["1"]["calls"] - before["1"]["calls"], after["1"]["images"] - before["1"]["images"]) == (4, 73)
    stats = requests.get(f"{one_process_server}/info", timeout=10).json()["stats"]
    assert (after["1"]["calls"], after["1"]["timed_calls"], after["1"]["images"]) == \
        (stats["model_calls"], stats["model_calls"], stats["images"])
    assert after["1"]["seconds"] == pytest.approx(stats["seconds"])


def test_python_client(server, direct, tmp_path):
    images = RNG.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "x.npy").write_bytes(npy(images))
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    with bentoml.SyncHTTPClient(server) as client:
        assert client.classify_batch(images=tmp_path / "x.npy")["class_ids"] == direct(images).argmax(1).tolist()
        body = client.classify_batch(images=tmp_path / "x.npy", probabilities=True)
        np.testing.assert_allclose(body["probabilities"], softmax(direct(images)), atol=1e-5)
        (prediction,) = client.classify(images=[tmp_path / "a.png"])["predictions"]
    assert prediction["class_id"] == int(direct(images[:1]).argmax())


def test_classify_png_matches_the_model(server, direct):
    images = RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    files = [("images", (f"{i}.png", image_bytes(Image.fromarray(a), "PNG"), "image/png")) for i, a in enumerate(images)]
    answer = requests.post(f"{server}/classify", files=files, timeout=60).json()
    ClassifyAnswer.model_validate(answer)
    predictions = answer["predictions"]
    probs = softmax(direct(images))
    for p, expected in zip(predictions, probs):
        top5 = np.argsort(-expected)[:5].tolist()
        assert [t["class_id"] for t in p["top5"]] == top5 and p["class_id"] == top5[0]
        assert p["class_name"] == f"class_{top5[0]:02d}"
        assert abs(p["probability"] - expected[top5[0]]) < 1e-5 and "note" not in p


def test_each_request_has_its_own_ids_in_its_header_and_the_access_log(server, start_server):
    # Tracing is off (BentoML's default sample rate 0): the ids still come, cheaply (bentoml-workarounds.md #6). The
    # header is BentoML's, on its API's answers (multipart bodies).
    png = image_bytes(Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "PNG")
    caller = "0af7651916cd43dd8448eb211c80319c"
    ids = [requests.post(f"{server}/classify", files={"images": ("a.png", png)}, headers=extra, timeout=60)
           .headers["X-BentoML-Request-ID"] for extra in ({}, {}, {"traceparent": f"00-{caller}-b7ad6b7169203331-01"})]
    assert len(set(ids)) == 3 and all(len(i) == 16 for i in ids)
    deadline = time.monotonic() + 10   # the access log line is written as the response ends
    while not all(f"span={i}," in start_server.log(server) for i in ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = {i: next(line for line in start_server.log(server).splitlines() if f"span={i}," in line) for i in ids}
    traces = [re.search(r"path=/classify,.*status=200.*trace=(\w{32}),.*sampled=(\d)", lines[i]).groups() for i in ids]
    assert traces[0][0] != traces[1][0] and traces[0][1] == traces[1][1] == "0"
    assert traces[2] == (caller, "1")   # the caller's trace, sampled as the caller asked


@pytest.mark.parametrize("which", ["server", "one_process_server"])
def test_raw_image_body_answers_as_the_upload_does(request, which):
    url = request.getfixturevalue(which)
    image = Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for fmt, content_type in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        data = image_bytes(image, fmt)
        raw = requests.post(f"{url}/classify", data=data, headers={"Content-Type": content_type}, timeout=60)
        assert raw.status_code == 200, raw.text
        upload = requests.post(f"{url}/classify", files={"images": ("a.img", data)}, timeout=60)
        assert raw.json() == upload.json()


def test_small_uploads_decode_on_the_event_loop():
    small = image_bytes(Image.new("RGB", (32, 32)), "PNG")
    assert quick_to_decode([small]) and quick_to_decode([small] * INLINE_IMAGES)
    assert not quick_to_decode([small] * (INLINE_IMAGES + 1))
    assert not quick_to_decode([image_bytes(Image.new("RGB", (129, 128)), "PNG")])   # over INLINE_PIXELS
    assert not quick_to_decode([image_bytes(Image.new("L", (2100, 2100)), "PNG")])   # a bomb: only its header read
    assert not quick_to_decode([b"not an image"])   # decode_image, in a thread, says why


def formats():
    rgb = Image.fromarray(RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    gray16 = Image.fromarray((RNG.integers(0, 256, (40, 40)) * 257).astype(np.uint16))
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
    animated = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    multipage = image_bytes(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    return {
        "jpeg": image_bytes(rgb.resize((640, 480)), "JPEG"), "gif-palette": image_bytes(rgb.convert("P"), "GIF"),
        "webp": image_bytes(rgb, "WEBP"), "bmp": image_bytes(rgb, "BMP"), "tiff": image_bytes(rgb, "TIFF"),
        "png-rgba": image_bytes(rgb.convert("RGBA"), "PNG"), "png-la": image_bytes(rgb.convert("LA"), "PNG"),
        "png-1bit": image_bytes(rgb.convert("1"), "PNG"), "jpeg-cmyk": image_bytes(rgb.convert("CMYK"), "JPEG"),
        "png-16bit-gray": image_bytes(gray16, "PNG"), "tiff-16bit-gray": image_bytes(gray16, "TIFF"),
        "gif-animated": animated, "tiff-multipage": multipage,
    }


def test_classify_any_format_and_mode(server):
    cases = formats()
    files = [("images", (f"{name}.bin", data, "application/octet-stream")) for name, data in cases.items()]
    response = requests.post(f"{server}/classify", files=files, timeout=60)
    assert response.status_code == 200, response.text
    predictions = dict(zip(cases, response.json()["predictions"]))
    for name, p in predictions.items():
        assert 0 <= p["class_id"] < 100 and len(p["top5"]) == 5, name
        assert ("note" in p) == (name in ("gif-animated", "tiff-multipage")), name
    assert predictions["gif-animated"]["note"] == "several frames (animated or multipage); classified the first"


def test_16bit_is_scaled_not_clipped():
    gray16 = Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(gray16))[0, :, 0].tolist() == [0, 128, 255]
    transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(to_rgb(transparent)).tolist() == [[[255] * 3] * 2] * 2  # composited onto white


def test_openapi_document_describes_answers_errors_and_info(server):
    doc = requests.get(f"{server}/docs.json", timeout=10).json()
    schemas = doc["components"]["schemas"]

    def resolve(schema):
        return schemas[schema["$ref"].split("/")[-1]] if "$ref" in schema else schema

    assert "application/x-npy" in doc["paths"]["/classify_batch"]["post"]["requestBody"]["content"]
    assert "image/*" in doc["paths"]["/classify"]["post"]["requestBody"]["content"]
    for route, answer, errors in (("/classify", "predictions", {"400", "413", "415", "503"}),
                                  ("/classify_batch", "class_ids", {"400", "413", "415", "422", "503"})):
        responses = doc["paths"][route]["post"]["responses"]
        assert answer in resolve(responses["200"]["content"]["application/json"]["schema"])["properties"]
        assert errors <= responses.keys()
        for status in errors:
            assert resolve(responses[status]["content"]["application/json"]["schema"])["required"] == ["error"]
    prediction = schemas["Prediction"]["properties"]
    assert {"class_id", "class_name", "probability", "top5", "note"} <= prediction.keys()
    info = doc["paths"]["/info"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"model", "metadata", "backend", "device", "precision", "batching", "stats"} <= resolve(info)["properties"].keys()
    assert requests.get(f"{server}/", timeout=10).text.count("swagger") > 0   # the Swagger UI reads it


# ---- bad input: a 4xx with a JSON message naming the problem, and the server stays up ------------------

def truncated_png():
    data = image_bytes(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    return data[: len(data) // 2]


BAD_IMAGES = {
    "not an image": (b"hello, this is text", 400, "not an image"),
    "truncated": (truncated_png(), 400, "truncated"),
    "empty": (b"", 400, "empty file"),
    "over the pixel limit (warning)": (image_bytes(Image.new("L", (1100, 1100)), "PNG"), 413, "too large"),
    "decompression bomb": (image_bytes(Image.new("L", (2100, 2100)), "PNG"), 413, "too large"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_images(server, case):
    data, status, message = BAD_IMAGES[case]
    good = image_bytes(Image.new("RGB", (32, 32)), "PNG")
    files = [("images", ("good.png", good, "image/png")), ("images", ("bad.png", data, "image/png"))]
    response = requests.post(f"{server}/classify", files=files, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["error"] and "images[1]" in response.json()["error"]
    raw = requests.post(f"{server}/classify", data=data, headers={"Content-Type": "image/png"}, timeout=60)
    assert raw.status_code == status and message in raw.json()["error"], raw.text
    assert_alive(server)


def truncated_npy():
    data = npy(np.zeros((10, 32, 32, 3), np.uint8))
    return data[:-100]


BAD_ARRAYS = {
    "wrong shape": (npy(np.zeros((2, 28, 28, 3), np.uint8)), 422, "expected an array of uint8 N×32×32×3"),
    "NCHW": (npy(np.zeros((2, 3, 32, 32), np.uint8)), 422, "(2, 3, 32, 32)"),
    "wrong dtype": (npy(np.zeros((2, 32, 32, 3), np.float32)), 422, "float32"),
    "python objects": (npy(np.array([{"x": 1}], dtype=object), allow_pickle=True), 400, "Python objects"),
    "empty batch": (npy(np.zeros((0, 32, 32, 3), np.uint8)), 400, "empty batch"),
    "over the image limit": (npy(np.zeros((65, 32, 32, 3), np.uint8)), 413, "65 images exceed the limit of 64"),
    "not npy": (b"\x89PNG not an array", 400, "not an .npy file"),
    "truncated npy": (truncated_npy(), 400, "truncated"),
}


@pytest.mark.parametrize("case", BAD_ARRAYS)
def test_bad_arrays(server, case):
    data, status, message = BAD_ARRAYS[case]
    response = requests.post(f"{server}/classify_batch", files={"images": ("x.npy", data)}, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert_alive(server)


def test_missing_field_and_no_files(server):
    response = requests.post(f"{server}/classify_batch", files={"other": ("x.npy", b"x")}, timeout=60)
    assert response.status_code == 400 and "images" in response.text
    response = requests.post(f"{server}/classify", files={"other": ("a.png", b"x")}, timeout=60)
    assert response.status_code == 400 and "images" in response.text
    response = requests.post(f"{server}/classify", data={"x": "1"}, timeout=60)   # a form without files
    assert response.status_code == 415 and "field images" in response.text
    assert_alive(server)


@pytest.mark.parametrize("endpoint, content_type, takes", [
    ("/classify_batch", "image/png", "application/x-npy"), ("/classify", "application/x-npy", "image/*"),
    ("/classify", "application/json", "image/*"), ("/classify", "text/plain", "multipart/form-data"),
    ("/classify_batch", None, "application/x-npy")])
def test_a_body_the_endpoint_does_not_take_gets_415(server, endpoint, content_type, takes):
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(f"{server}{endpoint}", data=b'{"images": ["x"]}', headers=headers, timeout=60)
    assert response.status_code == 415, response.text
    assert takes in response.json()["error"] and (content_type or "missing") in response.json()["error"]
    assert_alive(server)


def test_body_over_the_limit(server):
    big = os.urandom(int(1.5 * 2**20))
    response = requests.post(f"{server}/classify", files={"images": ("big.png", big)}, timeout=60)
    assert response.status_code == 413 and "CIFAR100_MAX_BODY_MB" in response.json()["error"]

    body = (b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="big.png"\r\n\r\n'
            + big + b"\r\n--xyz--\r\n")

    def chunks():  # no Content-Length: the body is counted as it arrives
        for i in range(0, len(body), 2**16):
            yield body[i:i + 2**16]
    response = requests.post(f"{server}/classify", data=chunks(), timeout=60,
                             headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert response.status_code == 413 and "over the limit" in response.json()["error"]
    assert_alive(server)


MALFORMED_MULTIPART = {  # (Content-Type, body, message)
    "no boundary": ("multipart/form-data", b"--xyz\r\n", "without a boundary"),
    "body without the boundary": ("multipart/form-data; boundary=xyz", b"not multipart at all" * 10, "malformed multipart"),
    "header without a colon": ("multipart/form-data; boundary=xyz",
                               b"--xyz\r\nContent-Disposition form-data\r\n\r\nx\r\n--xyz--\r\n", "malformed multipart"),
}


@pytest.mark.parametrize("case", MALFORMED_MULTIPART)
@pytest.mark.parametrize("endpoint", ["classify", "classify_batch"])
def test_malformed_multipart(server, endpoint, case):
    content_type, body, message = MALFORMED_MULTIPART[case]
    response = requests.post(f"{server}/{endpoint}", data=body, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert_alive(server)


# ---- adaptive batching ----------------------------------------------------------------------------------

def test_concurrent_requests_are_merged(server, direct):
    batches = [RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for _ in range(48)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda b: classify_batch(server, b), batches))
    for images, response in zip(batches, results):  # each request got its own rows back
        assert response.json()["class_ids"] == direct(images).argmax(1).tolist()
    assert requests.get(f"{server}/info", timeout=10).json()["stats"]["largest_call"] > 2
    metrics = requests.get(f"{server}/metrics", timeout=10).text
    calls = report.model_call_histogram(metrics)   # requests merged per model call
    assert calls["buckets"]["1.0"] < calls["count"], "no model call merged more than one request"


# ---- packaging -----------------------------------------------------------------------------------------

def test_bentoml_build(model_store):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BENTOML_HOME": str(model_store), "BENTOML_DO_NOT_TRACK": "True"}
    bentoml_cli = str(Path(sys.executable).parent / "bentoml")
    done = subprocess.run([bentoml_cli, "build", "--output", "tag"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    (bento,) = (model_store / "bentos").glob(f"{tag.replace(':', '/')}")
    assert (bento / "src" / "serving" / "service.py").is_file()
    assert not any((bento / "src").glob("tests")) and not any((bento / "src").glob(".venv"))
    manifest = (bento / "bento.yaml").read_text()  # models travel by reference, from the store into the image
    assert "tag: cifar100-classifier:" in manifest and "entry_service: Classifier" in manifest
    assert "bentoml==1.4.40" in (bento / "env" / "python" / "requirements.txt").read_text()
    assert not (bento / "src" / "export").exists()
    # The service, the PyTorch backend's checkpoint loading and the TensorRT runner import from the Bento alone.
    code = ("import sys, serving.service, serving.tensorrt, training.checkpoint\n"
            "ours = [m.__file__ for n, m in sys.modules.items() if n.split('.')[0] in ('serving', 'training', 'export')]\n"
            "print('\\n'.join(ours))")
    done = subprocess.run([sys.executable, "-c", code], cwd=bento / "src", capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(bento / "src"), "PYTHONSAFEPATH": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    files = done.stdout.split()
    assert files and all(f.startswith(str(bento / "src")) for f in files), files


# ---- the main job: python -m serving.up ------------------------------------------------------------------

def test_up_without_cifar100_points_to_synthetic(tmp_path):
    code = ("import training.data as d; d.URL = 'http://127.0.0.1:9/cifar-100-python.tar.gz'\n"
            f"from serving.up import main; main(['--data-dir', {str(tmp_path / 'data')!r}])")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("CIFAR100_SYNTHETIC", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "could not download CIFAR-100" in done.stderr and "--synthetic" in done.stderr


def test_up_synthetic_trains_exports_and_serves(tmp_path):
    from serving.local_server import free_port

    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    cmd = [sys.executable, "-m", "serving.up", "--synthetic", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--artifacts", str(tmp_path / "art")]
    log = open(tmp_path / "up.log", "wb")
    process = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        output = (tmp_path / "up.log").read_text(errors="replace")
        assert process.poll() is None, output[-3000:]
        assert f"curl -s {url}/info" in output and "/classify_batch" in output
        assert "listening on this machine only (--host 0.0.0.0 exposes it to the network)" in output
        info = requests.get(f"{url}/info", timeout=10).json()
        assert info["backend"] in ("onnx", "torch") and {"checkpoint.pt", "model.onnx"} <= set(info["metadata"]["artifacts"])
        assert info["metadata"]["test_acc"] > 0.3  # the smoke model really learned the generated classes
        assert classify_batch(url, np.zeros((3, 32, 32, 3), np.uint8)).status_code == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
