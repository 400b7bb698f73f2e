"""The one place that decides what a storage URL is, and the only one that touches storage.

A URL is a local path, ``file://<path>`` (the same) or ``s3://bucket/key`` (fsspec + s3fs, both
declared). Nothing else works end to end, so nothing else is accepted: ``check_url`` refuses any
other scheme (``gs://``, ``az://``, ``hdfs://``...) at config validation, naming the key. Every
other module calls these helpers with a URL and never builds a filesystem itself, so the S3 rules
live here only:

* the endpoint comes from an explicit argument, else ``AWS_ENDPOINT_URL_S3``, else
  ``AWS_ENDPOINT_URL`` (unset = AWS itself);
* credentials are NEVER passed in: botocore's standard chain (environment variables, the
  instance/pod role, the user's own AWS profile) finds them. Config files of this project must
  not hold secrets, so no function here takes a key.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Optional

import fsspec
from fsspec import AbstractFileSystem

# Remote schemes that work end to end (reading, writing, listing, checkpoints every node sees).
REMOTE_SCHEMES = ("s3",)
_MODEL_CACHE_DONE = ".aov_download_complete"


class UnsupportedURL(ValueError):
    """A URL whose scheme aov-dist cannot read or write; ``key`` is the config key that holds it."""

    def __init__(self, key: str, url: str):
        super().__init__(f"{key}: {url!r}: the scheme {scheme(url)!r} is not supported; use a local path, "
                         f"file://<path> or s3://bucket/prefix (S3-compatible stores: AWS_ENDPOINT_URL)")
        self.key = key


def scheme(url: str | os.PathLike) -> str:
    """"" for a local path (``file://`` included), else the lower-cased scheme."""
    text = os.fspath(url)
    if "://" not in text:
        return ""
    name = text.split("://", 1)[0].lower()
    return "" if name == "file" else name


def is_remote(url: str | os.PathLike) -> bool:
    """True for storage every node reaches (s3://); False for a node-local path."""
    return scheme(url) in REMOTE_SCHEMES


def check_url(url: Optional[str], key: str) -> None:
    """Raise UnsupportedURL (naming ``key``) for a URL no helper here could open."""
    if url and scheme(url) not in ("", *REMOTE_SCHEMES):
        raise UnsupportedURL(key, url)


def local_path(url: str | os.PathLike) -> str:
    """The path of a local URL (``file://`` stripped)."""
    text = os.fspath(url)
    return text[len("file://"):] if text.startswith("file://") else text


def s3_endpoint(explicit: Optional[str] = None) -> Optional[str]:
    """The S3 endpoint to use: the argument, else the standard AWS environment variables."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# Every S3 request of a copy to storage (checkpoints, exports) is retried by botocore itself
# ("standard" mode: exponential backoff with jitter, up to 20 s between tries): a storage hiccup
# of seconds costs a pause, not the step's work. Then the copy fails and says so.
WRITE_ATTEMPTS = 10


def get_fs(url: str, endpoint_url: Optional[str] = None,
           attempts: Optional[int] = None) -> tuple[AbstractFileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a URL; ``attempts``: botocore's retries of every
    S3 request (None: botocore's default).

    s3fs listing caches are switched off: the writer and ``inspect`` check files they (or another
    process) have just written, and a stale listing would report them missing.
    """
    check_url(url, "URL")
    if is_remote(url):
        kwargs: dict[str, Any] = {"use_listings_cache": False}
        endpoint = s3_endpoint(endpoint_url)
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if attempts is not None:
            kwargs["config_kwargs"] = {"retries": {"max_attempts": attempts, "mode": "standard"}}
        fs = fsspec.filesystem("s3", **kwargs)
        return fs, url.split("://", 1)[1].rstrip("/")
    return fsspec.filesystem("file"), os.path.abspath(local_path(url))


def open_url(url: str, mode: str = "rb", endpoint_url: Optional[str] = None) -> IO[Any]:
    """Open a file for reading or writing; local parent folders are created for writes."""
    fs, path = get_fs(url, endpoint_url)
    if "w" in mode and not is_remote(url):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode)


def read_bytes(url: str, endpoint_url: Optional[str] = None) -> bytes:
    with open_url(url, "rb", endpoint_url) as f:
        return f.read()


def write_bytes(url: str, data: bytes, endpoint_url: Optional[str] = None) -> None:
    with open_url(url, "wb", endpoint_url) as f:
        f.write(data)


def exists(url: str, endpoint_url: Optional[str] = None) -> bool:
    fs, path = get_fs(url, endpoint_url)
    return fs.exists(path)


def size(url: str, endpoint_url: Optional[str] = None) -> int:
    fs, path = get_fs(url, endpoint_url)
    return int(fs.size(path))


def modified(url: str, endpoint_url: Optional[str] = None) -> float:
    """Last modification time (seconds since the epoch) of a file."""
    fs, path = get_fs(url, endpoint_url)
    info = fs.info(path)
    stamp = info.get("mtime", info.get("LastModified", 0))
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or 0)


def makedirs(url: str, endpoint_url: Optional[str] = None) -> None:
    """Create a local folder (S3 has no folders: a no-op there)."""
    if not is_remote(url):
        fs, path = get_fs(url, endpoint_url)
        fs.makedirs(path, exist_ok=True)


def remove(url: str, endpoint_url: Optional[str] = None) -> None:
    fs, path = get_fs(url, endpoint_url)
    fs.rm(path)


def list_names(url: str, endpoint_url: Optional[str] = None) -> list[str]:
    """Base names of the files directly inside a folder (empty when it does not exist)."""
    fs, path = get_fs(url, endpoint_url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def download(url: str, local_file: str) -> int:
    """Copy one file to a local path; returns its size in bytes."""
    fs, path = get_fs(url)
    os.makedirs(os.path.dirname(os.path.abspath(local_file)), exist_ok=True)
    fs.get(path, local_file)
    return os.path.getsize(local_file)


def copy_to_local(url: str, local_dir: str) -> None:
    """Copy a folder's files (recursively) into a local folder."""
    fs, path = get_fs(url)
    fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)


def copy_from_local(local_dir: str, url: str) -> None:
    """Copy a local folder's files (recursively) to ``url``; each S3 request retried by botocore
    (WRITE_ATTEMPTS tries), then the error of the last one."""
    fs, path = get_fs(url, attempts=WRITE_ATTEMPTS)
    fs.put(local_dir.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)


def remove_tree(url: str) -> None:
    """Delete a folder and everything in it."""
    fs, path = get_fs(url)
    fs.rm(path, recursive=True)


def localize(url: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """A local folder holding the files of ``url`` (returned as is when already local).

    A remote folder is copied once per machine into ``cache_dir`` (default $AOV_CACHE or
    ~/.cache/aov_dist/models), keyed by the URL: the 8 workers of a GPU node share one copy (a file
    lock makes the others wait for it instead of downloading the same model 8 times), and a marker
    written last tells a complete copy from an interrupted one."""
    return localize_once(url, cache_dir)[0]


def localize_once(url: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None) -> tuple[Path, bool]:
    """``localize``, and whether this call did the copy (False: local, or another process's copy)."""
    text = os.fspath(url)
    if not is_remote(text):
        local = Path(local_path(text))
        if not local.is_dir():
            raise FileNotFoundError(f"model directory not found: {local}")
        return local, False

    def download(target: Path) -> None:
        fs, remote = get_fs(text)
        if not fs.isdir(remote):
            raise FileNotFoundError(f"model directory not found: {text}")
        copy_to_local(text, str(target))

    root = cache_dir or os.environ.get("AOV_CACHE", Path.home() / ".cache" / "aov_dist" / "models")
    return build_once(text.rstrip("/"), download, root)


def build_once(key: str, build: Callable[[Path], None], root: str | os.PathLike) -> tuple[Path, bool]:
    """The folder ``root/<hash of key>``, filled by ``build`` once per machine: the first process
    to get there builds it under a file lock, the others wait for it and reuse it; a marker written
    last tells a complete folder from an interrupted one (which is built again). Returns the
    folder and whether this call built it."""
    from filelock import FileLock

    root = Path(root)
    target = root / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (target / _MODEL_CACHE_DONE).exists():
        return target, False
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _MODEL_CACHE_DONE).exists():  # another worker of this machine built it meanwhile
            return target, False
        if target.exists():  # an interrupted build
            shutil.rmtree(target)
        target.mkdir(parents=True)
        build(target)
        (target / _MODEL_CACHE_DONE).write_text(key)
    return target, True


def check_relative(rel: str) -> str:
    """Refuse a relative path that could leave its base folder (absolute, ``..``, scheme, ``\\``).

    Manifests and record files come from outside: a hostile ``../../etc/passwd`` must never be
    joined onto a base folder.
    """
    if not rel or "\\" in rel or "://" in rel or rel.startswith("/") or "\x00" in rel:
        raise ValueError(f"unsafe relative path {rel!r}")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe relative path {rel!r}")
    return rel


def join_url(base: str, rel: str) -> str:
    """Join a safe relative path onto a local folder or an ``s3://`` prefix."""
    check_relative(rel)
    if is_remote(base):
        return base.rstrip("/") + "/" + rel
    return os.path.join(base, *rel.split("/"))


def dirname_url(url: str) -> str:
    """The folder of a file URL (``s3://b/p/manifest.json`` -> ``s3://b/p``)."""
    if is_remote(url):
        return url.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(url))
