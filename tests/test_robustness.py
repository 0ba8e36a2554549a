"""Accuracy on a corrupted test set: a CIFAR-100-C-format folder written from the generated data, scored by
serving.score (in-process and through a real service), its table, report.json and heatmap.png against answers
computed here; and the resumable, MD5-checked download of such a folder from a local server."""
import hashlib
import http.server
import json
import tarfile
import threading

import numpy as np
import pytest

from serving import score
from serving.backends import load_backend
from training import cifar100c
from training.cifar100c import COMMON_CORRUPTIONS, CORRUPTIONS
from training.cifar100c import FOLDER as C_FOLDER
from training.data import load_cifar100
from training.download import DownloadError, download, download_and_extract
from training.synthetic import write_corrupted, write_dataset

PER_SEVERITY = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A generated CIFAR-100 folder and, beside it, CIFAR-100-C/ (19 files of 5 × 20 images, labels.npy)."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, per_class=1, test_per_class=1)
    write_corrupted(root, per_severity=PER_SEVERITY)
    return root


@pytest.fixture(scope="module")
def predictions(data, model_dir):
    """What the model predicts for every row of every file, computed here, straight from the backend."""
    backend = load_backend("onnx", model_dir)
    return {name: backend(np.load(data / C_FOLDER / f"{name}.npy")).argmax(1) for name in CORRUPTIONS}


def run_score(capsys, *args):
    """(exit code, None when it ran through; stdout; stderr) of serving.score in this process."""
    code = None
    try:
        score.main(list(map(str, args)))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_generated_folder_has_cifar_100_c_s_layout(data):
    folder = data / C_FOLDER
    assert sorted(p.stem for p in folder.glob("*.npy")) == sorted([*CORRUPTIONS, "labels"])
    fog = np.load(folder / "fog.npy")
    assert fog.dtype == np.uint8 and fog.shape == (5 * PER_SEVERITY, 32, 32, 3)
    labels = np.load(folder / "labels.npy")
    assert labels.shape == (5 * PER_SEVERITY,) and (labels[:PER_SEVERITY] == labels[PER_SEVERITY:2 * PER_SEVERITY]).all()
    blocks = np.split(fog.astype(int), 5)   # stronger severities stray further from severity 1
    assert np.abs(blocks[4] - blocks[0]).mean() > np.abs(blocks[1] - blocks[0]).mean() > 0


def test_report_per_corruption_and_severity_matches_the_answer_computed_here(data, model_dir, predictions, tmp_path,
                                                                           capsys):
    code, out, _ = run_score(capsys, "--direct", model_dir, "--backend", "onnx", "--ood-dir", data,
                             "--out", tmp_path / "c.csv", "--report", tmp_path / "report", "--clean", data)
    assert code is None
    labels = np.load(data / C_FOLDER / "labels.npy")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    for name in CORRUPTIONS:
        right = predictions[name] == labels
        expected = {str(s + 1): float(b.mean()) for s, b in enumerate(np.split(right, 5))}
        assert report["corruptions"][name] == pytest.approx({**expected, "mean": float(right.mean())}), name
    means = [float((predictions[n] == labels).mean()) for n in CORRUPTIONS]
    assert report["mean"] == pytest.approx(np.mean(means))
    assert report["mean_15"] == pytest.approx(np.mean([m for n, m in zip(CORRUPTIONS, means) if n in COMMON_CORRUPTIONS]))
    test = load_cifar100(data)
    clean = load_backend("onnx", model_dir)(test.test_images).argmax(1)
    assert report["clean"] == pytest.approx(float((clean == test.test_labels).mean()))
    assert report["images"] == 19 * 5 * PER_SEVERITY and report["files"] == 19
    assert f"{report['mean']:.4f}   (the Kaggle score)" in out and "mean of the 15 common corruptions" in out
    assert out.count("\n") > 19 and "fog" in out
    png = (tmp_path / "report" / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    rows = (tmp_path / "c.csv").read_text().splitlines()
    assert rows[0] == "id,label" and rows[1].startswith("gaussian_noise_1_0,") and len(rows) == 1 + 19 * 100


def test_the_report_through_the_service_equals_the_one_in_process(data, model_dir, onnx_server, tmp_path, capsys):
    url = onnx_server
    for how, target in (("--url", url), ("--direct", model_dir)):
        code, _, _ = run_score(capsys, how, target, "--backend", "onnx", "--ood-dir", data, "--out",
                               tmp_path / f"{how}.csv", "--report", tmp_path / how)
        assert code is None
    served, direct = (json.loads((tmp_path / how / "report.json").read_text()) for how in ("--url", "--direct"))
    assert served["corruptions"] == direct["corruptions"] and served["mean"] == direct["mean"]
    assert served["model"]["service"]["backend"] == "onnx"
    assert (tmp_path / "--url.csv").read_bytes() == (tmp_path / "--direct.csv").read_bytes()


def test_a_training_checkpoint_is_scored_without_exporting_it(data, model_dir, predictions, tmp_path, capsys):
    for tta in ("none", "flip"):
        code, _, err = run_score(capsys, "--direct", model_dir / "checkpoint.pt", "--tta", tta, "--ood-dir", data,
                                 "--out", tmp_path / f"{tta}.csv")
        assert code is None, err
    rows = {tta: [int(line.split(",")[1]) for line in (tmp_path / f"{tta}.csv").read_text().splitlines()[1:]]
            for tta in ("none", "flip")}
    assert rows["none"] == np.concatenate([predictions[n] for n in CORRUPTIONS]).tolist()   # the ONNX file's answers
    assert rows["flip"] != rows["none"]


def test_per_row_labels_and_the_kaggle_layout(data, model_dir, predictions, tmp_path, capsys):
    # The Kaggle layout: distortion00..18.npy. Labels chosen so that exactly the rows i % 3 != 0 are right.
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    truth = []
    for k, name in enumerate(CORRUPTIONS):
        (kaggle / f"distortion{k:02d}.npy").write_bytes((data / C_FOLDER / f"{name}.npy").read_bytes())
        rows = np.arange(len(predictions[name]))
        truth.append(np.where(rows % 3 != 0, predictions[name], (predictions[name] + 1) % 100))
    np.save(tmp_path / "truth.npy", np.concatenate(truth))
    code, out, _ = run_score(capsys, "--direct", model_dir, "--backend", "onnx", "--ood-dir", kaggle, "--labels",
                             tmp_path / "truth.npy", "--out", tmp_path / "k.csv", "--report", tmp_path / "r")
    assert code is None
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    severity_1 = (np.arange(PER_SEVERITY) % 3 != 0).mean()
    assert report["corruptions"]["distortion00"]["1"] == pytest.approx(severity_1)
    assert report["mean"] == pytest.approx((np.arange(100) % 3 != 0).mean())
    assert report["mean_15"] is None   # the Kaggle files do not say which corruption they hold
    assert "15 common" not in out


@pytest.mark.parametrize("case, message", [
    ("missing file", "lacks 1 of the 19 files: fog.npy"),
    ("short labels", "holds 99 labels for 1900 images; expected 1900 or 100 (one per row of each file)"),
    ("report without labels", "--report needs the true labels"),
])
def test_bad_folders_and_labels_are_one_line_errors(data, model_dir, tmp_path, capsys, case, message):
    folder = tmp_path / C_FOLDER
    folder.mkdir()
    for path in (data / C_FOLDER).glob("*.npy"):
        if not (case == "missing file" and path.stem == "fog") and not (case == "report without labels"
                                                                         and path.stem == "labels"):
            (folder / path.name).symlink_to(path)
    extra = []
    if case == "short labels":
        np.save(tmp_path / "short.npy", np.zeros(99, np.int64))
        extra = ["--labels", tmp_path / "short.npy"]
    code, _, err = run_score(capsys, "--direct", model_dir, "--ood-dir", tmp_path, "--out", tmp_path / "x.csv",
                             "--report", tmp_path / "r", *extra)
    assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "r").exists()


# ---- the download ---------------------------------------------------------------------------------------------

class FlakyFileServer:
    """Serves one file over HTTP on 127.0.0.1 with Range requests; the first answer stops half way (an interrupted
    download)."""

    def __init__(self, path):
        content, server = path.read_bytes(), self
        self.requests, self.ranges = 0, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers["Range"] else 0
                server.ranges.append(start)
                body = content[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if server.requests == 1 else body)

            def log_message(self, *_):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{path.name}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def archive(data, tmp_path):
    path = tmp_path / "served" / "CIFAR-100-C.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        tar.add(data / C_FOLDER, arcname=C_FOLDER)
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def test_an_interrupted_download_resumes_and_is_extracted_once_complete(archive, tmp_path):
    path, md5 = archive
    server = FlakyFileServer(path)
    try:
        target = tmp_path / "ood"
        with pytest.raises(DownloadError, match="run again to resume"):
            download_and_extract(server.url, target, md5, C_FOLDER)
        part = target / "CIFAR-100-C.tar.part"
        arrived = part.stat().st_size
        assert 0 < arrived < path.stat().st_size and not (target / C_FOLDER).exists()
        folder = download_and_extract(server.url, target, md5, C_FOLDER)
        assert server.ranges == [0, arrived]   # the second request asked only for the rest
        assert len(list(folder.glob("*.npy"))) == 20 and not part.exists()
        assert (target / "CIFAR-100-C.tar").read_bytes() == path.read_bytes()
        assert download_and_extract(server.url, target, md5, C_FOLDER) == folder and server.requests == 2   # done
    finally:
        server.close()


def test_a_download_with_the_wrong_md5_is_refused_and_removed(archive, tmp_path):
    path, _ = archive
    server = FlakyFileServer(path)
    server.requests = 1   # no interruption
    try:
        with pytest.raises(DownloadError, match="MD5 is .* the published one 0+; deleted it"):
            download(server.url, tmp_path / "got" / "x.tar", "0" * 32)
        assert list((tmp_path / "got").iterdir()) == []   # neither x.tar nor x.tar.part
    finally:
        server.close()


def test_score_downloads_cifar_100_c_then_scores_it(archive, model_dir, tmp_path, capsys, monkeypatch):
    path, md5 = archive
    server = FlakyFileServer(path)
    server.requests = 1
    monkeypatch.setattr(cifar100c, "URL", server.url)
    monkeypatch.setattr(cifar100c, "MD5", md5)
    try:
        code, out, _ = run_score(capsys, "--direct", model_dir, "--ood-dir", tmp_path / "ood", "--download",
                                 "--out", tmp_path / "s.csv")
    finally:
        server.close()
    assert code is None and "accuracy" in out   # CIFAR-100-C's labels.npy came with it
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 1 + 19 * 100
