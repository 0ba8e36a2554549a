"""Hostile and careless clients, on a real `bentoml serve`: never a 5xx but 503, every refusal {"error": ...} naming
no path, socket or exception class; no URL or path fetched; .npy headers and decoded pixels checked before any work;
slow and oversized clients cut off; a refusal costs one log line at most. (The fuzz cases come from
bench/fuzz_images.py, which runs many more.)"""
import concurrent.futures
import functools
import http.server
import io
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from bench.fuzz_images import fuzz_cases, outcome
from serving.images import Upload, quick_to_decode
from training.contract import npy_bytes, random_images

# 8 MB bodies, 40 MB in flight: 24 MB for a bulk request (16 MB kept for small ones); 64 MB of decoding per request.
LIMITS = {"CIFAR100_BACKEND": "onnx", "CIFAR100_MAX_IMAGES": 1100, "CIFAR100_MAX_BODY_MB": 8,
          "CIFAR100_MAX_INFLIGHT_MB": 40, "CIFAR100_MAX_DECODED_MB": 64, "CIFAR100_HEADER_TIMEOUT_S": 1,
          "CIFAR100_BODY_TIMEOUT_S": 2}
LEAKS = re.compile(r"/tmp|\.sock|Traceback|\b[A-Z][a-zA-Z]*Error\b|Exception")


@pytest.fixture(scope="module")
def server(start_server):
    url = start_server(LIMITS)
    return url, lambda: start_server.log(url)


def refusal(response, status, *words):
    """The {"error": ...} of a refusal with STATUS that names WORDS and nothing internal."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict) and isinstance(body["error"], str), body
    assert all(w in body["error"] for w in words), body
    assert not LEAKS.search(body["error"]), body
    return body["error"]


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def alive(url):
    one = requests.post(f"{url}/classify_batch", data=npy_bytes(random_images(1)),
                        headers={"Content-Type": "application/x-npy"}, timeout=30)
    return one.status_code == 200 and len(one.json()["class_ids"]) == 1


# ---- nothing fetched ------------------------------------------------------------------------------------------

class Recorder(http.server.BaseHTTPRequestHandler):
    hits = []

    def do_GET(self):
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(png(Image.new("RGB", (32, 32))))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def listener():
    """An HTTP server on a loopback port that records what is fetched from it."""
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
        httpd.shutdown()


@pytest.mark.parametrize("endpoint", ["classify", "classify_batch"])
@pytest.mark.parametrize("value", ["{listener}/cat.png", "file:///etc/passwd", "/etc/passwd", "'{listener}/x'"])
def test_text_where_files_are_expected_is_refused_and_nothing_is_fetched(server, listener, endpoint, value):
    url, _ = server
    value = value.format(listener=listener)
    # BentoML's Path input fetched such a field (500 for a file: URL; a 400 whose body was a list for a local one).
    response = requests.post(f"{url}/{endpoint}", files=[("images", (None, value))], timeout=30)
    refusal(response, 400, "images: a text field where files are expected", "fetches no URL")
    if endpoint == "classify":   # one text part among files is refused as well
        mixed = [("images", ("a.png", png(Image.new("RGB", (8, 8))))), ("images", (None, value))]
        refusal(requests.post(f"{url}/classify", files=mixed, timeout=30), 400, "a text field")
    assert Recorder.hits == []


# ---- multipart: as many files as CIFAR100_MAX_IMAGES, 413 past it ----------------------------------------------

def test_more_files_than_starlettes_default_and_past_the_limit(server):
    url, _ = server
    tiny = png(Image.new("RGB", (8, 8), "red"))
    ok = requests.post(f"{url}/classify", files=[("images", (f"{i}.png", tiny)) for i in range(1001)], timeout=120)
    assert ok.status_code == 200, ok.text   # Starlette's parser stops at 1,000 files: it was a 500
    assert len(ok.json()["predictions"]) == 1001
    refusal(requests.post(f"{url}/classify", files=[("images", ("a.png", tiny))] * 1101, timeout=120), 413,
            "more than 1100 files", "CIFAR100_MAX_IMAGES")


# ---- .npy: checked in the front; a malformed request breaks no other ------------------------------------------

def npy_with(shape, body, version=(1, 0), descr="|u1"):
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header = header.ljust(118 if version == (1, 0) else 116) + b"\n"
    length = struct.pack("<H" if version == (1, 0) else "<I", len(header))
    return b"\x93NUMPY" + bytes(version) + length + header + body


IMAGE = 32 * 32 * 3
BAD_NPY = {
    "negative count, one image": (npy_with((-1, 32, 32, 3), bytes(IMAGE)), 400, "negative"),
    "negative count, not whole images": (npy_with((-1, 32, 32, 3), bytes(IMAGE - 72)), 400, "negative"),
    "negative count, past the limit": (npy_with((-1, 32, 32, 3), bytes(IMAGE * 1200)), 400, "negative"),
    "negative height": (npy_with((1, -32, -32, 3), bytes(IMAGE)), 400, "negative"),
    "a count past any memory": (npy_with((2**62, 32, 32, 3), bytes(IMAGE)), 413, "exceed the limit of 1100"),
    "a count of 4300 digits": (npy_with("(" + "9" * 4400 + ", 32, 32, 3)", b"", (2, 0)), 400, "unreadable .npy header"),
    "version 9.0": (npy_with((1, 32, 32, 3), bytes(IMAGE), (9, 0)), 400, "version 9.0"),
    "short body": (npy_with((3, 32, 32, 3), bytes(2 * IMAGE)), 400, "truncated"),
    "bytes after the images": (npy_with((1, 32, 32, 3), bytes(IMAGE + 1)), 400, "oversized"),
    "header cut short": (npy_with((1, 32, 32, 3), b"")[:40], 400, "unreadable .npy header"),
}


@pytest.mark.parametrize("case", BAD_NPY)
def test_bad_npy_headers_are_refused_in_the_front(server, case):
    url, _ = server
    data, status, words = BAD_NPY[case]
    refusal(requests.post(f"{url}/classify_batch", data=data, headers={"Content-Type": "application/x-npy"},
                          timeout=30), status, words)
    refusal(requests.post(f"{url}/classify_batch", files={"images": ("x.npy", data)}, timeout=30), status, words)


def test_a_malformed_request_never_fails_another(server):
    # A negative count over a body of 1,200 images once reached the model worker, which closed the channel: every
    # request in flight on it got a 503 naming the socket.
    url, _ = server
    bad = npy_with((-1, 32, 32, 3), bytes(IMAGE * 1200))
    good = [npy_bytes(random_images(n, seed=n)) for n in range(1, 25)]

    def post(body):
        return requests.post(f"{url}/classify_batch", data=body, headers={"Content-Type": "application/x-npy"},
                             timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:   # 4 bad bodies of 3.7 MB fit the 24 MB in flight
        answers = list(pool.map(post, [b for pair in zip(good, [bad] * len(good)) for b in pair]))
    assert answers[0::2] == [200] * len(good) and set(answers[1::2]) == {400}


# ---- methods ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, content_type, allow", [
    ("GET", "/classify", "image/png", "POST"), ("PUT", "/classify", "image/png", "POST"),
    ("DELETE", "/classify", None, "POST"), ("PATCH", "/classify_batch", "application/x-npy", "POST"),
    ("GET", "/classify_batch", "application/x-npy", "POST"), ("GET", "/classify", None, "POST"),
    ("POST", "/info", None, "GET"), ("DELETE", "/livez", None, "GET")])
def test_other_methods_get_405_with_allow_and_json(server, method, path, content_type, allow):
    url, _ = server
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.request(method, f"{url}{path}", data=b"x" if method != "GET" else None, headers=headers,
                                timeout=30)
    refusal(response, 405)
    assert allow in response.headers["Allow"]


def test_an_unknown_path_gets_404_json(server):
    url, _ = server
    refusal(requests.get(f"{url}/nothing/here", timeout=30), 404, "Not Found")


# ---- images: whatever Pillow raises is a 400 naming the file --------------------------------------------------

@functools.cache
def fuzzed():
    """2,000 mutated files, and what decoding each in this process gives."""
    return [(name, data, outcome(data)) for name, data in fuzz_cases(2000, seed=28)]


@pytest.mark.filterwarnings("ignore::UserWarning")   # Pillow's, on broken files (the service ignores them too)
def test_fuzzed_images_decode_or_are_refused():
    escaped = [(name, result) for name, _, result in fuzzed() if result[0] not in ("decoded", 400, 413)]
    assert not escaped, escaped[:10]
    assert 0.2 < sum(result[0] == "decoded" for *_, result in fuzzed()) / len(fuzzed()) < 0.9   # the mutations bite


def test_fuzzed_images_through_the_server(server):
    url, _ = server
    refused = [(name, data) for name, data, result in fuzzed()[:600] if result[0] != "decoded"][::4]
    sample = refused + [(name, data) for name, data, _ in fuzzed()[:20]]   # mostly broken files, some that decode
    for name, data in sample:
        for response in (requests.post(f"{url}/classify", data=data, headers={"Content-Type": "image/png"}, timeout=30),
                         requests.post(f"{url}/classify", files=[("images", ("a.png", png(Image.new("RGB", (8, 8))))),
                                                                 ("images", (name, data))], timeout=30)):
            if response.status_code != 200:
                refusal(response, response.status_code)
                assert response.status_code in (400, 413) and "images[" in response.json()["error"], name
    assert alive(url)


# ---- decoding: admitted before it starts, one full-size copy at most ------------------------------------------

def solid_png(side, mode="RGB"):
    return png(Image.new(mode, (side, side), "white"))


def test_decoding_more_than_a_request_may_is_refused(server):
    url, _ = server
    three = [("images", (f"{i}.png", solid_png(2400))) for i in range(3)]   # 3 × 22 MB decoded, 64 MB allowed
    refusal(requests.post(f"{url}/classify", files=three, timeout=60), 413, "CIFAR100_MAX_DECODED_MB")
    refusal(requests.post(f"{url}/classify", data=solid_png(2600, "RGBA"), headers={"Content-Type": "image/png"},
                          timeout=60), 413, "images[0]", "CIFAR100_MAX_INFLIGHT_MB")   # 26 MB: never fits in 24 MB
    assert requests.post(f"{url}/classify", files=three[:2], timeout=60).status_code == 200


def test_decoding_is_admitted_against_the_bytes_in_flight(server):
    url, _ = server
    image = solid_png(2300, "RGBA")   # 20 MB decoded
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as held:
        # 8 MB of body admitted, and held: its bytes stall (for CIFAR100_BODY_TIMEOUT_S)
        held.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 8000000\r\n\r\n"
                     + bytes(1000))
        time.sleep(0.2)
        busy = requests.post(f"{url}/classify", data=image, headers={"Content-Type": "image/png"}, timeout=60)
        refusal(busy, 503, "decoding images[0] (20 MB)", "CIFAR100_MAX_INFLIGHT_MB")
        assert 1 <= int(busy.headers["Retry-After"]) <= 60
        assert held.recv(4096).startswith(b"HTTP/1.1 408")
    assert requests.post(f"{url}/classify", data=image, headers={"Content-Type": "image/png"}, timeout=60).ok


PEAK = """
import re, sys
from serving.images import decode_image
data = open(sys.argv[1], "rb").read()
def peak(): return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) << 10
before = peak()
decode_image(data, "x")
print(peak() - before)
"""


def test_a_large_image_decodes_with_one_full_size_copy(tmp_path):
    side = 3000
    (tmp_path / "big.png").write_bytes(solid_png(side, "RGBA"))
    done = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "big.png")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    decoded = side * side * 4   # 34 MB; converting and resizing it whole made ~5 more copies
    assert int(done.stdout) < 1.5 * decoded


def test_what_decoding_holds_is_known_from_the_header():
    photo = io.BytesIO()
    Image.new("RGB", (4000, 3000)).save(photo, "JPEG")
    assert Upload(photo.getvalue(), "x").decoded_bytes == 500 * 375 * 4   # JPEG decodes at 1/8 scale
    assert Upload(solid_png(1000, "RGBA"), "x").decoded_bytes == 1000 * 1000 * 4
    assert Upload(solid_png(1000, "L"), "x").decoded_bytes == 1000 * 1000
    gray16 = png(Image.fromarray(np.zeros((100, 100), np.uint16)))
    assert Upload(gray16, "x").decoded_bytes == 100 * 100 * 2


def test_only_cheap_files_decode_on_the_event_loop():
    small = Image.fromarray(random_images(1)[0])
    assert quick_to_decode([png(small)])
    info = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
    for i in range(50):
        info.add_text(f"k{i}", "x" * 100_000, zip=True)   # 5 MB of text in a few KB: inflated when opened
    texts = io.BytesIO()
    small.save(texts, "PNG", pnginfo=info)
    assert len(texts.getvalue()) < 64 << 10 and not quick_to_decode([texts.getvalue()])
    for options in ({}, {"progressive": True}, {"exif": Image.Exif()}):
        jpeg = io.BytesIO()
        small.save(jpeg, "JPEG", **options)
        assert quick_to_decode([jpeg.getvalue()]) == (options == {}), options


# ---- slow and oversized clients -----------------------------------------------------------------------------

def exchange(url, data, wait=10.0):
    """Send DATA on a new connection; (what came back until the server closed it, seconds to the close)."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=wait) as s:
        start = time.monotonic()
        try:
            s.sendall(data)
        except OSError:   # the server refused and closed while we were still sending
            pass
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:
            pass
        return answer, time.monotonic() - start


def status_and_error(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"], head.lower()


@pytest.mark.parametrize("case", ["half a head", "nothing", "a 70 KiB header", "an 8 MB header", "a stalled body",
                                  "a body over the limit", "a second request's head, half sent", "not HTTP"])
def test_slow_and_oversized_clients_are_cut_off(server, case):
    url, _ = server
    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    sent, status, words, within = {
        "half a head": (b"GET /livez HTTP/1.1\r\nHost: x\r\n", 408, "CIFAR100_HEADER_TIMEOUT_S", (0.9, 4)),
        "nothing": (b"", None, None, (0.9, 4)),
        "a 70 KiB header": (b"GET /livez HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "64 KiB", (0, 2)),
        "an 8 MB header": (b"GET /livez HTTP/1.1\r\nX-Big: " + b"a" * 8_000_000, 431, "CIFAR100_MAX_HEADER_KB", (0, 5)),
        "a stalled body": (head + b"Content-Length: 100000\r\n\r\n" + bytes(1000), 408, "CIFAR100_BODY_TIMEOUT_S",
                           (1.9, 5)),
        "a body over the limit": (head + b"Content-Length: 100000000\r\n\r\n" + bytes(1000), 413,
                                  "CIFAR100_MAX_BODY_MB", (0, 2)),
        "a second request's head, half sent": (b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\nGET /livez HTTP/1.1\r\n", 408,
                                               "CIFAR100_HEADER_TIMEOUT_S", (0.9, 4)),
        "not HTTP": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100), 400, "Invalid HTTP request", (0, 2)),
    }[case]
    answer, seconds = exchange(url, sent)
    assert within[0] <= seconds <= within[1], (seconds, answer[:300])   # then the server closed the connection
    if status is None or case == "an 8 MB header" and not answer:   # closed while the client was still sending
        assert answer == b""
        return
    got, error, headers = status_and_error(answer[answer.rfind(b"HTTP/1.1 "):])   # the last answer
    assert got == status and words in error and b"connection: close" in headers, answer[:300]


def test_a_refused_chunked_body_closes_the_connection(server):
    url, _ = server
    sent = 0

    def chunks():   # 200 MB, far more than the 8 MB allowed
        nonlocal sent
        for _ in range(3200):
            sent += 1 << 16
            yield bytes(1 << 16)

    response = requests.post(f"{url}/classify", data=chunks(), headers={"Content-Type": "image/png"}, timeout=60)
    refusal(response, 413, "CIFAR100_MAX_BODY_MB")
    assert response.headers["Connection"] == "close" and sent < 40 << 20   # the server read no further


def test_a_client_that_hangs_up_costs_one_line(server):
    url, log = server
    before = log()
    for content_type in (b"image/png", b"multipart/form-data; boundary=xyz"):
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type +
                      b"\r\nContent-Length: 100000\r\n\r\n--xyz\r\nContent-Disposition: form-data; name=images; "
                      b"filename=a.png\r\n\r\n" + bytes(1000))
            time.sleep(0.3)
    deadline = time.monotonic() + 10
    while log().count("hung up") - before.count("hung up") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    new = log()[len(before):]
    assert new.count("hung up") == 2 and "Traceback" not in new and "[ERROR]" not in new


def test_refusals_left_no_traceback_and_no_error_in_the_log(server):
    url, log = server   # after every test above: hundreds of refusals
    text = log()
    assert "Traceback" not in text and "[ERROR]" not in text and "Exception in ASGI" not in text
    warnings = [line for line in text.splitlines() if "[WARNING]" in line]
    assert all("refused" in line or "Invalid HTTP request received" in line for line in warnings), warnings[:5]
    assert text.count("Invalid HTTP request received") == 1   # the one request that was not HTTP, logged once
