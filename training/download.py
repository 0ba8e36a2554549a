"""Resumable downloads, checked against a published MD5, extracted only when complete.

The bytes go to DEST.part; after an interruption the next call continues it with an HTTP Range request (a server
that ignores the range sends the whole file again). DEST appears (renamed) only when its MD5 matches; an archive
is extracted into a temporary folder that is renamed into place, so a folder is there whole or not at all.
"""
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import requests
from tqdm import tqdm

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class DownloadError(Exception):
    pass


def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url, dest, md5, timeout=60):
    """DEST (a Path), fetched from URL unless it is already there with this MD5."""
    dest = Path(dest)
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    try:
        with requests.get(url, stream=True, timeout=timeout, headers={"Range": f"bytes={have}-"} if have else {}) as r:
            if r.status_code == 416:   # nothing left to send: the .part is complete
                pass
            else:
                r.raise_for_status()
                if have and r.status_code != 206:
                    log.info("%s does not resume downloads: starting over", url)
                    have = 0
                total = have + int(r.headers.get("Content-Length", 0)) or None
                if have:
                    log.info("resuming %s at %.1f MB", dest.name, have / 2**20)
                with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                                   desc=dest.name, leave=False) as bar:
                    for block in r.iter_content(CHUNK):
                        f.write(block)
                        bar.update(len(block))
    except requests.RequestException as e:
        raise DownloadError(f"could not download {url}: {e} ({part.name} keeps what arrived; run again to "
                            "resume)") from None
    got = md5sum(part)
    if got != md5:
        part.unlink()
        raise DownloadError(f"{url}: the download's MD5 is {got}, the published one {md5}; deleted it, run again")
    os.replace(part, dest)
    return dest


def download_and_extract(url, folder, md5, expect):
    """FOLDER/EXPECT, the top folder of the archive at URL, downloaded (resumably) and extracted when it is not there
    yet. The archive stays in FOLDER, so a later call extracts again without downloading."""
    folder, target = Path(folder), Path(folder) / expect
    if target.is_dir():
        return target
    archive = download(url, folder / url.rsplit("/", 1)[-1], md5)
    log.info("extracting %s", archive.name)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".extract-") as scratch:
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, filter="data")   # no absolute paths, links out of the folder, devices
        if not (Path(scratch) / expect).is_dir():
            raise DownloadError(f"{archive} does not hold a folder {expect}")
        shutil.move(str(Path(scratch) / expect), target)
    return target
