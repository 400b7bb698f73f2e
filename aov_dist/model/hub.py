"""Model directories on local disk or any fsspec URL (s3://...): copy remote ones to a local cache."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_DONE = ".aov_download_complete"


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path) and not os.fspath(path).startswith("file://")


def localize(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory holding the files of `path` (returned as is when already local).

    A remote directory is copied once into `cache_dir` (default $AOV_CACHE or ~/.cache/aov_dist/models),
    keyed by the URL; a marker file written last tells a complete copy from an interrupted one.
    """
    text = os.fspath(path)
    if not is_remote(text):
        local = Path(text.removeprefix("file://"))
        if not local.is_dir():
            raise FileNotFoundError(f"model directory not found: {local}")
        return local
    import fsspec  # only remote paths need it

    root = Path(cache_dir or os.environ.get("AOV_CACHE", Path.home() / ".cache" / "aov_dist" / "models"))
    target = root / hashlib.sha256(text.rstrip("/").encode()).hexdigest()[:16]
    if (target / _DONE).exists():
        return target
    fs, remote = fsspec.core.url_to_fs(text)
    if not fs.isdir(remote):
        raise FileNotFoundError(f"model directory not found: {text}")
    target.mkdir(parents=True, exist_ok=True)
    fs.get(remote.rstrip("/") + "/", str(target) + "/", recursive=True)
    (target / _DONE).write_text(text)
    return target
