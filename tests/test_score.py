"""serving/score.py: the Kaggle OOD submission through the real service, resumable and restart-proof."""
import http.server
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving import score
from training.synthetic import make_images

ROOT = Path(__file__).resolve().parents[1]
PER_FILE = 10                       # images per distortion file: 2 per severity
TOTAL = score.N_FILES * PER_FILE


def write_ood(folder, per_file=PER_FILE, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(score.N_FILES):
        np.save(folder / f"distortion{k:02d}.npy", make_images(rng.integers(0, 100, per_file), rng))
    return folder


def expected_ids(per_file=PER_FILE):
    block = per_file // 5
    return [f"distortion{k:02d}_{s}_{i}" for k in range(score.N_FILES) for s in range(1, 6) for i in range(block)]


def read_csv(path):
    lines = Path(path).read_text().splitlines()
    assert lines[0] == "id,label"
    ids, labels = zip(*(line.split(",") for line in lines[1:]))
    return list(ids), [int(x) for x in labels]


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "serving.score", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, **kwargs)


@pytest.fixture(scope="module")
def ood(tmp_path_factory):
    return write_ood(tmp_path_factory.mktemp("ood"))


# ---------------------------------------------------------------- offline: validation, ids, chunks

class CountingServer:
    """A loopback HTTP server that only counts requests and answers 503 (with Retry-After when given one): proves
    the client sent none, or how it waited."""

    def __init__(self, retry_after=None):
        counter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self):
                counter.requests += 1
                self.send_response(503)
                if retry_after is not None:
                    self.send_header("Retry-After", str(retry_after))
                self.end_headers()
            do_GET = do_POST = _any

            def log_message(self, *_):
                pass

        self.requests = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def counting_server():
    server = CountingServer()
    yield server
    server.close()


def _object_array(path):
    np.save(path, np.array([{"pickled": True}] * 5, dtype=object), allow_pickle=True)


MALFORMED = {
    "missing": (lambda p: p.unlink(), "lacks 1 of the 19 files: distortion07.npy"),
    "float32": (lambda p: np.save(p, np.zeros((10, 32, 32, 3), np.float32)), "expected an array of uint8 N×32×32×3"),
    "shape": (lambda p: np.save(p, np.zeros((10, 32, 32), np.uint8)), "expected an array of uint8 N×32×32×3"),
    "not_multiple_of_5": (lambda p: np.save(p, np.zeros((12, 32, 32, 3), np.uint8)), "not a multiple of 5"),
    "empty": (lambda p: np.save(p, np.zeros((0, 32, 32, 3), np.uint8)), "empty batch (0 images)"),
    "not_npy": (lambda p: p.write_text("id,label\n"), "not a readable .npy array"),
    "pickled": (_object_array, "not a readable .npy array"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:500]), "not a readable .npy array"),
    "npz": (lambda p: np.savez(open(p, "wb"), images=np.zeros((10, 32, 32, 3), np.uint8)), "not a single .npy array"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_ood_files_are_rejected_before_any_request(case, tmp_path, ood, counting_server, capsys):
    folder = tmp_path / "ood"
    folder.mkdir()
    for f in ood.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    spoil, message = MALFORMED[case]
    spoil(folder / "distortion07.npy")
    out = tmp_path / "sub.csv"
    with pytest.raises(SystemExit) as exit_:
        score.main(["--url", counting_server.url, "--ood-dir", str(folder), "--out", str(out), "--retries", "1"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    if case != "missing":
        assert "distortion07.npy" in err
    assert counting_server.requests == 0
    assert not out.exists() and not Path(f"{out}.parts").exists()


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    done = run_cli("--ood-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.csv"))
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: no OOD folder at {tmp_path / 'nowhere'}"
    zero = run_cli("--ood-dir", str(tmp_path), "--out", str(tmp_path / "x.csv"), "--in-flight", "0")
    assert zero.returncode == 2 and "--in-flight must be at least 1" in zero.stderr   # not "the default"


def test_labels_file_is_checked_up_front(tmp_path, ood, counting_server, capsys):
    np.save(tmp_path / "labels.npy", np.zeros(TOTAL - 1, np.int64))
    with pytest.raises(SystemExit):
        score.main(["--url", counting_server.url, "--ood-dir", str(ood), "--out", str(tmp_path / "x.csv"),
                    "--labels", str(tmp_path / "labels.npy")])
    assert f"holds {TOTAL - 1} labels for {TOTAL} images" in capsys.readouterr().err
    assert counting_server.requests == 0


@pytest.mark.parametrize("retries", [0, 3])
def test_gives_up_after_bounded_retries(tmp_path, ood, counting_server, capsys, retries):
    """A service that keeps answering 503: the first try and exactly --retries more, then a clear error."""
    start = time.monotonic()
    with pytest.raises(SystemExit):
        score.main(["--url", counting_server.url, "--ood-dir", str(ood), "--out", str(tmp_path / "x.csv"),
                    "--retries", str(retries), "--backoff", "0.05"])
    err = capsys.readouterr().err
    assert "answered HTTP 503" in err and f"gave up after {retries} retries" in err
    assert err.count("retry ") == retries and (retries == 0 or f"retry {retries}/{retries} " in err)
    assert counting_server.requests == retries + 1       # GET /info: the first try and the retries
    assert time.monotonic() - start < 5
    assert not (tmp_path / "x.csv").exists()


def test_a_busy_service_is_waited_out_as_asked_within_the_patience(tmp_path, ood, capsys):
    server = CountingServer(retry_after=1)
    try:
        start = time.monotonic()
        with pytest.raises(SystemExit):
            score.main(["--url", server.url, "--ood-dir", str(ood), "--out", str(tmp_path / "x.csv"),
                        "--retries", "0", "--patience", "2.5"])
        seconds = time.monotonic() - start
    finally:
        server.close()
    err = capsys.readouterr().err
    # Two waits of 1 s as asked, none counted as a retry (--retries 0), then the patience is spent.
    assert server.requests == 3 and 2 <= seconds < 5
    assert err.count("busy, waiting 1 s as asked") == 2 and "retry " not in err
    assert "more than --patience 2.5 s allows" in err.strip().splitlines()[-1]


def test_chunks_and_ids_follow_submission_order(ood):
    sources, _, _ = score.open_ood_dir(ood)
    chunks = score.plan_chunks(sources, 4)
    # Chunks never cross files and cover each file once, in order.
    assert chunks[:3] == [(0, 0, 4), (0, 4, 8), (0, 8, 10)] and chunks[-1] == (18, 8, 10)
    assert len(chunks) == 3 * score.N_FILES
    ids = [i for s, a, b in chunks for i in sources[s].ids(a, b)]
    assert ids == expected_ids()
    assert ids[:5] == ["distortion00_1_0", "distortion00_1_1", "distortion00_2_0", "distortion00_2_1",
                       "distortion00_3_0"]
    assert isinstance(sources[0].images, np.memmap)      # memory-mapped, not read into RAM


def write_sample(path, ids, header="id,label", newline="\n", bom=""):
    """A sample submission in the competition's format: the header, then every id with a placeholder label."""
    path.write_text(bom + newline.join([header, *(f"{i},0" for i in ids)]) + newline, newline="")
    return path


def test_a_sample_submission_in_the_competitions_format_passes(ood, tmp_path):
    sources, _, _ = score.open_ood_dir(ood)
    score.check_sample_submission(write_sample(tmp_path / "sample.csv", expected_ids()), sources)
    # Saved by a spreadsheet on Windows: a byte-order mark and CRLF line ends are no difference.
    score.check_sample_submission(write_sample(tmp_path / "win.csv", expected_ids(), newline="\r\n", bom="\ufeff"),
                                  sources)


SWAPPED = expected_ids()
SWAPPED[1], SWAPPED[2] = SWAPPED[2], SWAPPED[1]
SAMPLES = {   # what the sample holds -> the one line that names its first difference
    "order": (SWAPPED, {}, "sample.csv line 3: id 'distortion00_2_0', where this submission has 'distortion00_1_1'"),
    "shorter": (expected_ids()[:-1], {}, f"sample.csv ends after {TOTAL - 1} ids; this submission has {TOTAL}, "
                                         "the next being 'distortion18_5_1'"),
    "longer": (expected_ids() + ["distortion19_1_0"], {},
               f"sample.csv line {TOTAL + 2}: id 'distortion19_1_0', after this submission's last row (it has {TOTAL})"),
    "other_ids": ([f"test_{i}" for i in range(TOTAL)], {},
                  "sample.csv line 2: id 'test_0', where this submission has 'distortion00_1_0'"),
    "header": (expected_ids(), {"header": "Id,Category"},
               "sample.csv line 1: the header is 'Id,Category', the submission's is 'id,label'"),
}


@pytest.mark.parametrize("case", SAMPLES)
def test_a_different_sample_submission_stops_the_run_before_anything_is_sent(case, tmp_path, ood, counting_server,
                                                                             capsys):
    ids, options, message = SAMPLES[case]
    sample = write_sample(tmp_path / "sample.csv", ids, **options)
    out = tmp_path / "sub.csv"
    with pytest.raises(SystemExit) as exit_:
        score.main(["--url", counting_server.url, "--ood-dir", str(ood), "--out", str(out),
                    "--sample-submission", str(sample)])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / message}"
    assert counting_server.requests == 0
    assert not out.exists() and not Path(f"{out}.parts").exists()


def test_a_missing_sample_submission_is_one_line(tmp_path, ood):
    done = run_cli("--ood-dir", str(ood), "--out", str(tmp_path / "x.csv"), "--sample-submission",
                   str(tmp_path / "nowhere.csv"))
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: --sample-submission {tmp_path / 'nowhere.csv'}: No such file or directory"


# ---------------------------------------------------------------- against a real `bentoml serve`

N_CHUNKS = TOTAL // 5               # with --chunk-size 5


def score_in_process(capsys, *args):
    """Run the CLI in this process; returns what it printed to stdout and to stderr."""
    score.main(list(map(str, args)))
    captured = capsys.readouterr()
    return captured.out, captured.err


ONNX = {"CIFAR100_BACKEND": "onnx"}   # the runs are compared byte for byte with --direct --backend onnx


@pytest.fixture(scope="module")
def server(onnx_server):
    return onnx_server


@pytest.fixture(scope="module")
def reference(server, ood, tmp_path_factory):
    """An uninterrupted run through the service: the CSV every other run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "submission.csv"
    done = run_cli("--url", server, "--ood-dir", str(ood), "--out", str(out), "--chunk-size", "5", "--in-flight", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"scored {TOTAL} images in {N_CHUNKS} requests" in done.stdout
    return out


def test_submission_has_the_exact_ids_order_and_rows(reference):
    ids, labels = read_csv(reference)
    assert ids == expected_ids() and len(ids) == TOTAL
    assert all(0 <= y < 100 for y in labels)
    assert len(set(labels)) > 1                              # a real model answered, not a constant
    assert not Path(f"{reference}.parts").exists()           # progress removed once the CSV is complete


def test_a_matching_sample_submission_lets_the_run_write(reference, ood, model_dir, tmp_path, capsys):
    sample = write_sample(tmp_path / "sample.csv", expected_ids())
    out, _ = score_in_process(capsys, "--direct", model_dir / "model.onnx", "--ood-dir", ood, "--out",
                              tmp_path / "checked.csv", "--sample-submission", sample)
    assert f"({TOTAL} rows)" in out
    assert (tmp_path / "checked.csv").read_bytes() == reference.read_bytes()


def test_the_function_a_notebook_calls_is_the_command(reference, ood, model_dir, tmp_path, capsys):
    figures = score.score(str(model_dir / "model.onnx"), ood, tmp_path / "nb.csv", chunk_size=64)
    assert (figures["rows"], figures["images"], figures["complete"]) == (TOTAL, TOTAL, True)
    assert (tmp_path / "nb.csv").read_bytes() == reference.read_bytes()
    with pytest.raises(score.OptionError, match="--chunk-size must be at least 1"):
        score.score(str(model_dir), ood, tmp_path / "x.csv", chunk_size=0)
    with pytest.raises(score.ScoreError, match="no OOD folder at"):
        score.score("http://127.0.0.1:9", tmp_path / "nowhere", tmp_path / "x.csv")


def test_service_and_direct_backend_agree_exactly(reference, ood, model_dir, tmp_path, capsys):
    direct = tmp_path / "direct.csv"
    out, _ = score_in_process(capsys, "--direct", model_dir, "--backend", "onnx", "--ood-dir", ood, "--out", direct,
                           "--chunk-size", 64)
    assert f"wrote {direct} ({TOTAL} rows)" in out
    assert direct.read_bytes() == reference.read_bytes()
    out, _ = score_in_process(capsys, "--direct", model_dir / "model.onnx", "--ood-dir", ood, "--out", direct)
    assert direct.read_bytes() == reference.read_bytes()      # a lone .onnx file, default chunks
    # Known labels: the direct predictions score 100 %, a shifted copy scores 0 %.
    _, labels = read_csv(direct)
    np.save(tmp_path / "labels.npy", np.array(labels))
    np.save(tmp_path / "wrong.npy", (np.array(labels) + 1) % 100)
    out, _ = score_in_process(capsys, "--direct", model_dir, "--backend", "onnx", "--ood-dir", ood, "--out", tmp_path / "again.csv",
                           "--labels", tmp_path / "labels.npy")
    assert f"accuracy 1.0000 on {TOTAL} images" in out
    out, _ = score_in_process(capsys, "--direct", model_dir, "--backend", "onnx", "--ood-dir", ood, "--out", tmp_path / "again.csv",
                           "--labels", tmp_path / "wrong.npy")
    assert f"accuracy 0.0000 on {TOTAL} images" in out


def test_cifar_test_split_through_the_service(server, tmp_path, capsys):
    from training.synthetic import write_dataset
    write_dataset(tmp_path / "data", per_class=1, test_per_class=1)
    out, _ = score_in_process(capsys, "--url", server, "--cifar-test", tmp_path / "data", "--out", tmp_path / "t.csv",
                           "--chunk-size", 32)
    assert "scored 100 images in 4 requests" in out and "accuracy " in out
    ids, _ = read_csv(tmp_path / "t.csv")
    assert ids == [f"test_{i}" for i in range(100)]


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def chunk_files(out):
    return sorted(Path(f"{out}.parts").glob("chunk*.npy"))


def test_resume_after_kill_sends_only_the_rest_and_matches(server, ood, reference, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    args = ["--url", server, "--ood-dir", str(ood), "--out", str(out), "--chunk-size", "5", "--in-flight", "1"]
    client = subprocess.Popen([sys.executable, "-m", "serving.score", *args, "--rate", "8"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(chunk_files(out)) >= 3 or client.poll() is not None, 120, "the first chunks")
    finally:
        client.send_signal(signal.SIGKILL)
        client.communicate()
    done = len(chunk_files(out))
    assert 3 <= done < N_CHUNKS and not out.exists(), "the client was not killed mid-way"

    printed, _ = score_in_process(capsys, *args)
    assert f"scored {TOTAL - 5 * done} images in {N_CHUNKS - done} requests" in printed
    assert f"{5 * done} resumed" in printed
    assert out.read_bytes() == reference.read_bytes()
    assert not Path(f"{out}.parts").exists()


def test_progress_of_other_inputs_is_not_reused(server, ood, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    parts = Path(f"{out}.parts")
    parts.mkdir()
    (parts / "manifest.json").write_text('{"inputs": "something else"}')
    np.save(parts / "chunk000000.npy", np.full(5, 7, np.uint8))      # would poison row 0..4 if reused
    printed, err = score_in_process(capsys, "--url", server, "--ood-dir", ood, "--out", out, "--chunk-size", 5)
    assert f"scored {TOTAL} images in {N_CHUNKS} requests" in printed
    assert "starting over" in err


def test_survives_a_server_restart(model_store, ood, reference, tmp_path):
    """Stop the service mid-run and start it again on the same port: the client retries and finishes."""
    from serving.local_server import LocalServer
    own = LocalServer(model_store, ONNX, run_dir=tmp_path / "first")
    out = tmp_path / "submission.csv"
    client = subprocess.Popen([sys.executable, "-m", "serving.score", "--url", own.url, "--ood-dir", str(ood),
                               "--out", str(out), "--chunk-size", "5", "--in-flight", "2", "--rate", "5",
                               "--retries", "12", "--backoff", "0.5"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    restarted = None
    try:
        wait_for(lambda: len(chunk_files(out)) >= 3 or client.poll() is not None, 120, "the first chunks")
        own.stop()
        stopped_at = len(chunk_files(out))
        restarted = LocalServer(model_store, ONNX, run_dir=tmp_path / "again", port=own.port)   # the same port again
        stdout, stderr = client.communicate(timeout=180)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
        own.stop()
        if restarted:
            restarted.stop()
    assert client.returncode == 0, stderr[-2000:]
    assert stopped_at < N_CHUNKS, "the run ended before the server stopped"
    assert "cannot reach" in stderr and "retry" in stderr
    assert out.read_bytes() == reference.read_bytes()
