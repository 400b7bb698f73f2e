"""The one place where aov-dist touches storage: local paths and ``s3://`` through fsspec/s3fs.

Every other module calls these helpers with a URL (a local path, ``file://...`` or
``s3://bucket/key``) and never builds a filesystem itself, so the S3 rules live here only:

* the endpoint comes from an explicit argument, else ``AWS_ENDPOINT_URL_S3``, else
  ``AWS_ENDPOINT_URL`` (unset = AWS itself);
* credentials are NEVER passed in: botocore's standard chain (environment variables, the
  instance/pod role, the user's own AWS profile) finds them. Config files of this project must
  not hold secrets, so no function here takes a key.
"""
from __future__ import annotations

import os
import posixpath
from typing import IO, Any, Optional

import fsspec
from fsspec import AbstractFileSystem

REMOTE_SCHEMES = ("s3://",)


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_SCHEMES)


def s3_endpoint(explicit: Optional[str] = None) -> Optional[str]:
    """The S3 endpoint to use: the argument, else the standard AWS environment variables."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def get_fs(url: str, endpoint_url: Optional[str] = None) -> tuple[AbstractFileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a URL.

    s3fs listing caches are switched off: the writer and ``inspect`` check files they (or another
    process) have just written, and a stale listing would report them missing.
    """
    if url.startswith("s3://"):
        kwargs: dict[str, Any] = {"use_listings_cache": False}
        endpoint = s3_endpoint(endpoint_url)
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        fs = fsspec.filesystem("s3", **kwargs)
        return fs, url[len("s3://"):].rstrip("/")
    if "://" in url and not url.startswith("file://"):
        raise ValueError(f"unsupported URL scheme in {url!r}: use a local path or s3://bucket/prefix")
    path = url[len("file://"):] if url.startswith("file://") else url
    return fsspec.filesystem("file"), os.path.abspath(path)


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
