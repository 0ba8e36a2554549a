"""Score the Kaggle test set (or CIFAR-100-C) through the service and write the submission CSV; with labels, the
accuracy per corruption and severity.

    python -m serving.score --url http://127.0.0.1:3000 --ood-dir DIR --out submission.csv
    python -m serving.score --direct model.onnx --ood-dir DIR --out direct.csv   # no service, same CSV
    python -m serving.score --direct best.pt --ood-dir data --download --out c.csv --report reports --clean data
    python -m serving.score --cifar-test data --out cifar_test.csv              # prints the accuracy
    python -m serving.score --ood-dir DIR --out submission.csv --sample-submission sample_submission.csv

    from serving.score import score                  # the same from Python; options as keyword arguments
    figures = score("http://127.0.0.1:3000", "data/ood", "submission.csv")

DIR holds distortion00.npy … distortion18.npy (the Kaggle files) or CIFAR-100-C's <corruption>.npy files and
labels.npy; each file is uint8 N×32×32×3, 5 severities of N/5 images. Files are memory-mapped, sent in uint8
chunks to /classify_batch (each chunk's .npy bytes as the request body) with several requests in flight, and
every finished chunk is saved under OUT.parts/, so a killed run started again sends only what is missing. OUT
appears (atomically) only when every row is there; then OUT.parts/ is removed. With the competition's sample
submission, its ids and their order are checked before anything is sent.
"""
import argparse
import concurrent.futures as cf
import csv
import itertools
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import requests
from tqdm import tqdm

from serving import workers
from serving.access import AccessError, bearer_headers
from serving.robustness import accuracy_report, table_text, write_report
from training import cifar100c, contract
from training.contract import CHECKPOINT_FILE, NUM_CLASSES, ONNX_FILE, TTA, BatchError, check_batch
from training.download import DownloadError, download_and_extract
from training.files import atomic_path, write_json

N_FILES, N_SEVERITIES = 19, 5       # the Kaggle layout: 19 corruptions, 5 severities each
HEADER = ("id", "label")             # the submission's columns
# The service is (re)starting, overloaded, or lost its model process for a moment: worth another try
# (a chunk is idempotent, so sending it twice is harmless; every retry is reported).
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_DELAY = 30.0                      # seconds, the longest wait between two tries
IN_FLIGHT_PER_WORKER = 4              # requests at once per model worker: one computing, the next ones arriving


class ScoreError(Exception):
    pass


class OptionError(ScoreError):
    """An option out of range, or options that do not go together (the command line's usage error)."""


class Cancelled(Exception):
    pass


@dataclass
class Source:
    """One array of images and how its rows are named in the CSV."""
    name: str
    images: np.ndarray          # uint8 N×32×32×3, usually a read-only memory map
    path: Path | None = None

    def ids(self, start, stop):
        if self.path is None:                   # CIFAR-100 test: test_0, test_1, ...
            return [f"{self.name}_{i}" for i in range(start, stop)]
        block = len(self.images) // N_SEVERITIES
        return [f"{self.name}_{i // block + 1}_{i % block}" for i in range(start, stop)]


def _check_images(images, where):
    if not isinstance(images, np.ndarray):
        getattr(images, "close", lambda: None)()
        raise ScoreError(f"{where}: not a single .npy array (an .npz archive?)")
    try:
        check_batch(images.dtype, images.shape)
    except BatchError as e:
        raise ScoreError(f"{where}: {e}") from None


def open_ood_dir(ood_dir):
    """(sources, layout, CIFAR-100-C's shared labels or None): the 19 files of a Kaggle folder (distortion00.npy …)
    or of a CIFAR-100-C folder (<corruption>.npy …, labels.npy; also when given the folder holding CIFAR-100-C/),
    as read-only memory maps, all checked before anything is sent."""
    ood_dir = Path(ood_dir)
    if (ood_dir / cifar100c.FOLDER).is_dir():
        ood_dir = ood_dir / cifar100c.FOLDER
    if not ood_dir.is_dir():
        raise ScoreError(f"no OOD folder at {ood_dir}")
    kaggle = [ood_dir / f"distortion{k:02d}.npy" for k in range(N_FILES)]
    named = [ood_dir / f"{name}.npy" for name in cifar100c.CORRUPTIONS]
    layout, paths = ("kaggle", kaggle) if any(p.is_file() for p in kaggle) or not any(p.is_file() for p in named) \
        else ("cifar100c", named)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ScoreError(f"{ood_dir} lacks {len(missing)} of the {N_FILES} files: {', '.join(missing)}")
    sources = []
    for path in paths:
        images = load_npy(path)
        _check_images(images, path)
        if len(images) % N_SEVERITIES:
            raise ScoreError(f"{path}: {len(images)} images is not a multiple of {N_SEVERITIES} "
                             "(one equal block per severity)")
        sources.append(Source(path.stem, images, path))
    shared = ood_dir / "labels.npy" if layout == "cifar100c" and (ood_dir / "labels.npy").is_file() else None
    return sources, layout, shared


def load_npy(path, mmap_mode="r"):
    try:   # allow_pickle=False: a file holding Python objects is refused, never unpickled
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except Exception as e:
        raise ScoreError(f"{path} is not a readable .npy array: {str(e).splitlines()[0]}") from None


def open_cifar_test(data_dir):
    """The CIFAR-100 test split as one source, and its true labels."""
    from training.data import DataError, load_cifar100
    try:
        data = load_cifar100(data_dir)
    except DataError as e:
        raise ScoreError(str(e)) from None
    return [Source("test", data.test_images)], data.test_labels


def read_labels(path, sources):
    """The true label of every row, in submission order: from a file with one label per row, or with one per row
    of each file (CIFAR-100-C's labels.npy, shared by its 19 files)."""
    labels = load_npy(path, mmap_mode=None)
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ScoreError(f"{path}: expected a 1-D integer array of labels")
    total, sizes = sum(len(s.images) for s in sources), {len(s.images) for s in sources}
    if len(labels) != total and not (len(sizes) == 1 and len(labels) in sizes):
        per_file = f" or {sizes.pop()} (one per row of each file)" if len(sizes) == 1 and len(sources) > 1 else ""
        raise ScoreError(f"{path} holds {len(labels)} labels for {total} images; expected {total}{per_file}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ScoreError(f"{path}: labels outside 0..{NUM_CLASSES - 1}")
    return (labels if len(labels) == total else np.tile(labels, len(sources))).astype(np.int64)


def plan_chunks(sources, chunk_size):
    """(source index, start, stop) for every chunk, file by file, in submission order."""
    return [(s, rows.start, rows.stop) for s, src in enumerate(sources) for rows in contract.chunks(len(src.images), chunk_size)]


class Progress:
    """Finished chunks on disk: OUT.parts/chunk000123.npy (labels), each written atomically.

    manifest.json records what the chunks mean (input files, sizes, chunk size, model); a run with
    a different manifest starts over instead of mixing old labels into a new submission.
    """

    def __init__(self, folder, manifest):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = None
            if old != manifest:
                print(f"{self.folder}: left by a run on other inputs or another model; starting over",
                      file=sys.stderr)
                shutil.rmtree(self.folder)
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(path, manifest)

    def _path(self, i):
        return self.folder / f"chunk{i:06d}.npy"

    def load(self, i, size):
        """The saved labels of chunk i, or None when it still has to be scored."""
        try:
            labels = np.load(self._path(i), allow_pickle=False)
        except (OSError, ValueError):
            return None
        return labels if labels.shape == (size,) else None

    def save(self, i, labels):
        with atomic_path(self._path(i)) as tmp, open(tmp, "wb") as f:
            np.save(f, labels.astype(np.uint8), allow_pickle=False)

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def _error_text(response):
    try:
        return str(response.json().get("error", response.text))[:300]
    except ValueError:
        return response.text.strip()[:300] or response.reason


def service_url(url):
    """URL without its trailing / when it looks like http(s)://HOST:PORT, else a ScoreError."""
    parsed = urlparse(str(url))
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ScoreError(f"--url must look like http://HOST:PORT, got {url!r}")
    return str(url).rstrip("/")


class ServiceScorer:
    """Labels for uint8 chunks from POST /classify_batch; retries while the service is unreachable."""

    def __init__(self, url, retries=8, backoff=0.5, timeout=300.0, rate=None, patience=600.0):
        try:   # the service's token, when it wants one: CIFAR100_API_TOKEN(_FILE), as the service reads it
            self.headers = bearer_headers()
        except AccessError as e:
            raise ScoreError(str(e)) from None
        self.url, self.retries, self.backoff, self.timeout = service_url(url), retries, backoff, timeout
        self.patience, self.waited = patience, 0.0   # seconds the service asked us to wait (Retry-After), in all
        self.interval = 1.0 / rate if rate else 0.0
        self.stop = threading.Event()
        self._local, self._rate_lock, self._next_slot = threading.local(), threading.Lock(), 0.0
        self.requests = 0

    def _session(self):   # requests.Session is not thread-safe: one per worker thread
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            self._local.session.headers.update(self.headers)
        return self._local.session

    def _wait_for_slot(self):
        if not self.interval:
            return
        with self._rate_lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self.interval
        if self.stop.wait(slot - now):
            raise Cancelled

    def _request(self, method, path, **kwargs):
        """The response of the first try that reached a ready service: the first try, then up to `retries`
        more after growing waits. A busy service's Retry-After is waited out without using up a retry, as long
        as such waits stay within `patience` seconds in all."""
        attempt = 0
        while True:
            try:
                response = self._session().request(method, self.url + path, timeout=self.timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as e:
                problem = f"cannot reach {self.url} ({type(e).__name__})"
            else:
                if response.status_code == 401:   # another try would not change the token
                    how = "is CIFAR100_API_TOKEN the service's token?" if self.headers else \
                        "set CIFAR100_API_TOKEN (or CIFAR100_API_TOKEN_FILE) to its token"
                    raise ScoreError(f"{self.url} refused the request (HTTP 401: {_error_text(response)}): {how}")
                if response.status_code not in RETRY_STATUS:
                    return response
                problem = f"{self.url}{path} answered HTTP {response.status_code}: {_error_text(response)}"
                busy = response.headers.get("Retry-After", "")
                if busy.isdigit():   # the service said when to come back: not a failure
                    if self.waited + int(busy) > self.patience:
                        raise ScoreError(f"{problem}; the service has been busy for {self.waited:.0f} s of "
                                         f"waiting, more than --patience {self.patience:g} s allows")
                    self.waited += int(busy)
                    tqdm.write(f"busy, waiting {busy} s as asked: {problem}", file=sys.stderr)
                    if self.stop.wait(int(busy)):
                        raise Cancelled
                    continue
            if attempt == self.retries:
                raise ScoreError(f"{problem}; gave up after {self.retries} retries")
            delay = min(self.backoff * 2 ** attempt, MAX_DELAY)
            attempt += 1
            tqdm.write(f"retry {attempt}/{self.retries} in {delay:g} s: {problem}", file=sys.stderr)
            if self.stop.wait(delay):
                raise Cancelled

    def describe(self):
        """What the manifest records about the model: the service's /info (its model and backend)."""
        response = self._request("GET", "/info")
        if not response.ok:
            raise ScoreError(f"{self.url}/info answered HTTP {response.status_code}: {_error_text(response)}")
        try:
            info = response.json()
        except ValueError:
            raise ScoreError(f"{self.url}/info did not answer JSON; is this the CIFAR-100 service?") from None
        metadata = info.get("metadata") or {}
        self.model_workers = workers.listed(info)
        return {"service": {"model": info.get("model"), "checkpoint_sha256": metadata.get("checkpoint_sha256"),
                            "backend": info.get("backend"), "precision": info.get("precision")}}

    def __call__(self, images):
        self._wait_for_slot()
        response = self._request("POST", "/classify_batch", data=contract.npy_bytes(images),   # the raw .npy body
                                 headers={"Content-Type": "application/x-npy"})
        self.requests += 1
        if not response.ok:
            hint = " (lower --chunk-size)" if response.status_code == 413 else ""
            raise ScoreError(f"{self.url}/classify_batch answered HTTP {response.status_code}: "
                             f"{_error_text(response)}{hint}")
        try:
            return np.asarray(response.json()["class_ids"], dtype=np.int64)
        except (ValueError, KeyError, TypeError):
            raise ScoreError(f"{self.url}/classify_batch answered without class_ids: {response.text[:200]}") from None


def _store_entry(tag):
    import bentoml
    try:
        return Path(bentoml.models.get(tag).path)
    except Exception:
        raise ScoreError(f"--direct {tag}: no such file or folder, nor a model in the BentoML store") from None


class DirectScorer:
    """The same chunks through serving.backends in this process (no service), to compare with it.

    ARTIFACT is a model folder (a store entry's files), a store tag, a lone .onnx file, or a training checkpoint
    (.pt: its model in PyTorch, with test-time augmentation TTA).
    """

    LONE_FILES = {".onnx": (ONNX_FILE, ("auto", "onnx")), ".pt": (CHECKPOINT_FILE, ("auto", "torch"))}

    def __init__(self, artifact, backend="auto", device=None, tta=None):
        path = Path(artifact)
        if path.is_file():
            store_name, kinds = self.LONE_FILES.get(path.suffix, (None, ()))
            if backend not in kinds:
                raise ScoreError(f"--direct {path}: a lone file must be an .onnx model (with --backend onnx or auto) "
                                 "or a .pt checkpoint (with --backend torch or auto)")
            with tempfile.TemporaryDirectory(prefix="score-direct-") as folder:   # backends read a store entry
                (Path(folder) / store_name).symlink_to(path.resolve())
                self.backend = self._load(kinds[1], folder, device, tta)
        else:
            path = path if path.is_dir() else _store_entry(artifact)
            self.backend = self._load(backend, path, device, tta)
        self.artifact, self.stop, self.requests = path, threading.Event(), 0

    @staticmethod
    def _load(kind, folder, device, tta):
        from serving.backends import load_backend
        try:
            return load_backend(kind, folder, device, tta)
        except Exception as e:
            raise ScoreError(f"cannot load the {kind} backend from {folder}: {str(e).splitlines()[0]}") from None

    def describe(self):
        path = self.artifact
        files = [path] if path.is_file() else sorted(p for p in path.glob("*") if p.is_file())
        return {"direct": {"artifact": str(path.resolve()), "backend": self.backend.name,
                           "precision": self.backend.precision, "tta": getattr(self.backend, "tta", None),
                           "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}}

    def __call__(self, images):
        self.requests += 1
        return np.asarray(self.backend(images)).argmax(axis=1)


def figures(images, seconds, complete, **extra):
    """The scoring figures in one schema, for a finished run (--json) and for one cut short (bench/end_to_end.py
    counts its saved chunks): images scored by this run, its seconds, img/s, and what else is known."""
    return {"complete": complete, "images": int(images), "seconds": round(seconds, 3),
            "img_per_s": images / seconds if seconds > 0 else 0.0, **extra}


def score_chunks(sources, chunks, scorer, progress, in_flight=4):
    """Score every chunk not yet on disk, with up to `in_flight` at once; returns (labels, new images)."""
    sizes = [stop - start for _, start, stop in chunks]
    labels = [progress.load(i, n) for i, n in enumerate(sizes)]
    todo = [i for i, done in enumerate(labels) if done is None]
    bar = tqdm(total=sum(sizes), initial=sum(sizes) - sum(sizes[i] for i in todo), unit="img",
               unit_scale=True, smoothing=0.1, dynamic_ncols=True, file=sys.stderr)

    def work(i):
        s, start, stop = chunks[i]
        result = scorer(np.ascontiguousarray(sources[s].images[start:stop]))
        if result.shape != (stop - start,) or result.min() < 0 or result.max() >= NUM_CLASSES:
            raise ScoreError(f"chunk {i}: expected {stop - start} class ids in 0..{NUM_CLASSES - 1}, "
                             f"got shape {result.shape}")
        progress.save(i, result)
        return i, result

    pool = cf.ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="score")
    pending, queue = set(), iter(todo)
    try:
        while True:   # keep 2× in_flight chunks queued: enough to stay busy, little memory
            for i in queue:
                pending.add(pool.submit(work, i))
                if len(pending) >= 2 * in_flight:
                    break
            if not pending:
                break
            finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                i, result = future.result()
                labels[i] = result
                bar.update(sizes[i])
    finally:
        scorer.stop.set()            # wakes workers waiting to retry, so an error ends the run now
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return labels, sum(sizes[i] for i in todo)


def submission_ids(sources):
    for source in sources:
        yield from source.ids(0, len(source.images))


def check_sample_submission(path, sources):
    """The competition's sample submission has this submission's header, ids and order; else a ScoreError naming
    the first difference. Only its ids are read (its labels are placeholders)."""
    total = sum(len(s.images) for s in sources)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:   # -sig: a spreadsheet's byte-order mark is no id
            reader = csv.reader(f)
            rows = (row for row in reader if row)
            header = next(rows, [])
            if tuple(h.strip() for h in header) != HEADER:
                raise ScoreError(f"{path} line 1: the header is {','.join(header)!r}, the submission's is "
                                 f"{','.join(HEADER)!r}")
            for n, (theirs, ours) in enumerate(itertools.zip_longest(rows, submission_ids(sources))):
                if theirs is None:
                    raise ScoreError(f"{path} ends after {n} ids; this submission has {total}, the next being {ours!r}")
                if ours is None:
                    raise ScoreError(f"{path} line {reader.line_num}: id {theirs[0]!r}, after this submission's "
                                     f"last row (it has {total})")
                if theirs[0].strip() != ours:
                    raise ScoreError(f"{path} line {reader.line_num}: id {theirs[0]!r}, where this submission has "
                                     f"{ours!r}")
    except OSError as e:
        raise ScoreError(f"--sample-submission {path}: {e.strerror or e}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise ScoreError(f"--sample-submission {path} is not a readable CSV file: {e}") from None


def write_csv(out, sources, chunks, labels):
    """id,label rows in submission order; the file appears only complete, with its rows counted."""
    total = sum(stop - start for _, start, stop in chunks)
    with atomic_path(out) as tmp:
        with open(tmp, "w", newline="") as f:
            f.write(",".join(HEADER) + "\n")
            for (s, start, stop), chunk_labels in zip(chunks, labels):
                f.write("".join(f"{i},{int(y)}\n" for i, y in zip(sources[s].ids(start, stop), chunk_labels)))
        with open(tmp, "rb") as f:
            rows = sum(1 for _ in f) - 1
        if rows != total:
            raise ScoreError(f"{tmp} has {rows} rows, expected {total}")
    return rows


def predict(sources, chunk_size, scorer, model, parts, in_flight):
    """Every row of SOURCES scored, resuming from the PARTS folder (kept for a model described as MODEL): (labels
    per source, the chunks, labels per chunk, images scored now, seconds, the Progress)."""
    chunks = plan_chunks(sources, chunk_size)
    inputs = [[s.name, s.path.stat().st_size, s.path.stat().st_mtime_ns] if s.path else [s.name, len(s.images)]
              for s in sources]
    progress = Progress(parts, {"inputs": inputs, "chunk_size": chunk_size, "model": model})
    start = time.perf_counter()
    labels, new_images = score_chunks(sources, chunks, scorer, progress, in_flight)
    per_source = [np.concatenate([labels[i] for i, (s, _, _) in enumerate(chunks) if s == k])
                  for k in range(len(sources))]
    return per_source, chunks, labels, new_images, time.perf_counter() - start, progress


def score(url_or_model, ood_dir=None, out="submission.csv", *, cifar_test=None, labels=None, report=None,
          clean=None, download=False, sample_submission=None, backend="auto", tta=None, chunk_size=2048,
          in_flight=None, retries=8, backoff=0.5, timeout=300.0, patience=600.0, rate=None, json_file=None):
    """Score the images of OOD_DIR (the Kaggle files or CIFAR-100-C), or with cifar_test=DATA_DIR the CIFAR-100 test
    split, write the submission CSV OUT and return the run's figures (images, seconds, img_per_s, rows; with labels
    the accuracy; with report=DIR the means of DIR/report.json).

    URL_OR_MODEL is the service (http://HOST:PORT) or, scored in this process, a model folder, a BentoML store tag,
    an .onnx file or a training checkpoint (.pt). The other keywords are the command's options
    (`python -m serving.score --help`). A bad option raises OptionError, any other problem ScoreError (or
    DownloadError); every input is checked before the first request, and nothing half-written is left.
    """
    for name, value, least in (("--chunk-size", chunk_size, 1), ("--in-flight", in_flight, 1),
                               ("--retries", retries, 0)):
        if value is not None and value < least:
            raise OptionError(f"{name} must be at least {least}")
    if backoff < 0 or patience < 0 or timeout <= 0 or (rate is not None and rate <= 0):
        raise OptionError("--backoff and --patience must be >= 0, --timeout and --rate > 0")
    if (ood_dir is None) == (cifar_test is None):
        raise OptionError("give either the Kaggle folder (--ood-dir) or --cifar-test")
    if (report or clean or download) and not ood_dir:
        raise OptionError("--report, --clean and --download go with --ood-dir")
    if clean and not report:
        raise OptionError("--clean goes with --report")
    if Path(out).is_dir():
        raise ScoreError(f"--out {out} is a folder; give the CSV file to write")
    if ood_dir and download:
        download_and_extract(cifar100c.URL, ood_dir, cifar100c.MD5, cifar100c.FOLDER)
    if ood_dir:
        sources, layout, shared_labels = open_ood_dir(ood_dir)
        true_labels = read_labels(labels or shared_labels, sources) if labels or shared_labels else None
    else:
        (sources, true_labels), layout = open_cifar_test(cifar_test), "cifar100"
        if labels:
            true_labels = read_labels(labels, sources)
    if report and true_labels is None:
        raise ScoreError("--report needs the true labels: --labels FILE (CIFAR-100-C's labels.npy is found by itself)")
    if sample_submission:
        check_sample_submission(sample_submission, sources)
    clean_split = open_cifar_test(clean) if clean else None
    total = sum(len(s.images) for s in sources)
    direct = "://" not in str(url_or_model)
    scorer = DirectScorer(url_or_model, backend, tta=tta) if direct else \
        ServiceScorer(url_or_model, retries, backoff, timeout, rate, patience)
    model = scorer.describe()
    in_flight = 1 if direct else in_flight or IN_FLIGHT_PER_WORKER * scorer.model_workers

    per_source, chunks, chunk_labels, new_images, seconds, progress = predict(sources, chunk_size, scorer, model,
                                                                              f"{out}.parts", in_flight)
    rows = write_csv(out, sources, chunks, chunk_labels)
    progress.remove()
    result = figures(new_images, seconds, True, requests=scorer.requests, resumed=total - new_images, rows=rows,
                     out=str(out), model=model, layout=layout)
    resumed = f"; {result['resumed']} resumed from {out}.parts" if result["resumed"] else ""
    print(f"scored {new_images} images in {scorer.requests} requests, {seconds:.1f} s "
          f"({result['img_per_s']:.0f} img/s){resumed}")
    print(f"wrote {out} ({rows} rows)")
    if true_labels is not None:
        result["accuracy"] = float((np.concatenate(per_source) == true_labels).mean())
        print(f"accuracy {result['accuracy']:.4f} on {total} images")
    if report:
        clean_accuracy = None
        if clean_split:
            guesses, *_, clean_progress = predict(clean_split[0], chunk_size, scorer, model, f"{out}.clean.parts",
                                                  in_flight)
            clean_progress.remove()
            clean_accuracy = float((guesses[0] == clean_split[1]).mean())
        accuracy = accuracy_report(sources, per_source, true_labels, clean_accuracy, model)
        print(table_text(accuracy))
        write_report(Path(report), accuracy)
        result["report"] = {k: accuracy[k] for k in ("mean", "mean_15", "clean")}
        print(f"wrote {report}/report.json and heatmap.png")
    if json_file:
        write_json(json_file, result)
    return result


def service_url_option(text):
    try:
        return service_url(text)
    except ScoreError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--url ")) from None


def main(argv=None, prog="python -m serving.score"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ood-dir", help="the Kaggle files (distortion00.npy …) or CIFAR-100-C (<corruption>.npy …, "
                                        "labels.npy), or the folder holding CIFAR-100-C/")
    what.add_argument("--cifar-test", metavar="DIR", help="score the CIFAR-100 test split in DIR instead")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--url", default="http://127.0.0.1:3000", type=service_url_option,
                     help="the running service (default %(default)s)")
    how.add_argument("--direct", metavar="ARTIFACT", help="score without the service: a model folder (store entry), "
                                                          "a store tag, an .onnx file or a training checkpoint (.pt)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "tensorrt"],
                   help="backend for --direct (default %(default)s)")
    p.add_argument("--tta", choices=TTA, default=None,
                   help="--direct with a checkpoint or the torch backend: test-time augmentation (default: the "
                        "model's own, none for a checkpoint)")
    p.add_argument("--out", required=True, help="the CSV to write")
    p.add_argument("--sample-submission", metavar="FILE",
                   help="the competition's sample submission (id,label): its ids and their order must be this "
                        "submission's, checked before anything is sent or written")
    p.add_argument("--labels", help=".npy of true labels, one per row in submission order or one per row of each "
                                    "file (CIFAR-100-C's labels.npy is found by itself): report the accuracy")
    p.add_argument("--report", metavar="DIR", help="with labels: write DIR/report.json (accuracy per corruption and "
                                                   "severity, the means) and DIR/heatmap.png")
    p.add_argument("--clean", metavar="DATA_DIR", help="with --report: also score the CIFAR-100 test split in "
                                                       "DATA_DIR, for the clean accuracy beside the corrupted one")
    p.add_argument("--download", action="store_true",
                   help=f"download CIFAR-100-C ({cifar100c.URL}, 2.9 GB, resumable) into --ood-dir when it is not there")
    p.add_argument("--chunk-size", type=int, default=2048, help="images per request (default %(default)s)")
    p.add_argument("--in-flight", type=int, default=None,
                   help=f"requests at once (default: {IN_FLIGHT_PER_WORKER} per model worker of the service)")
    p.add_argument("--retries", type=int, default=8,
                   help="retries per request after its first try, 0: none (default %(default)s)")
    p.add_argument("--backoff", type=float, default=0.5,
                   help="first wait in seconds before a retry, doubled each time (default %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default %(default)s)")
    p.add_argument("--patience", type=float, default=600.0,
                   help="seconds in all to wait when a busy service asks to (Retry-After) before giving up "
                        "(default %(default)s)")
    p.add_argument("--rate", type=float, default=None, help="at most this many requests per second (default: no limit)")
    p.add_argument("--json", dest="json_file",
                   help="also write the run's figures (images, seconds, img/s, accuracy, ...) to this file")
    options = vars(p.parse_args(argv))
    url, direct = options.pop("url"), options.pop("direct")
    try:
        score(direct or url, **options)
    except OptionError as e:
        p.error(str(e))
    except (ScoreError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"interrupted; finished chunks are kept in {options['out']}.parts/ (run the same command to resume)",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
