"""Atomic file writes: a reader never sees a half-written checkpoint, CSV or plot."""
import contextlib
import json
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, data):
    """Write `data` as indented JSON (non-JSON values as str) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")


def save_figure(fig, path, dpi=110):
    """Save a matplotlib figure as PNG to `path` atomically, then close it."""
    import matplotlib.pyplot as plt  # lazy: most importers of this module never plot
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
