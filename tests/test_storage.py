"""aov_dist/storage.py: the one rule for storage URLs, and one model copy per machine."""
from __future__ import annotations

import multiprocessing as mp

import pytest

from aov_dist import storage


def _localize(url: str, cache: str, out) -> None:
    path, copied = storage.localize_once(url, cache)
    out.put((str(path), copied, sorted(p.name for p in path.iterdir())))


def test_workers_of_one_machine_copy_a_remote_model_once(s3_bucket, tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        storage.write_bytes(f"{s3_bucket}/model/{name}", name.encode() * 20000)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_localize, args=(f"{s3_bucket}/model", str(tmp_path / "cache"), out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [copied for _, copied, _ in results].count(True) == 1  # one download, three waited for it
    assert len({path for path, _, _ in results}) == 1
    assert all(files == [".aov_download_complete", "config.json", "model.safetensors", "tokenizer.json"]
               for _, _, files in results)
    assert storage.localize_once(f"{s3_bucket}/model", str(tmp_path / "cache"))[1] is False  # cached


@pytest.mark.parametrize("url, remote", [("s3://b/k", True), ("/data/x", False), ("file:///data/x", False),
                                         ("relative/x", False)])
def test_what_is_remote(url, remote):
    assert storage.is_remote(url) is remote


@pytest.mark.parametrize("url", ["gs://b/k", "az://c/k", "hdfs://nn/k", "memory://x"])
def test_unsupported_schemes_are_refused_naming_the_key(url):
    with pytest.raises(storage.UnsupportedURL, match=rf"^model.pretrained_path: '{url}': the scheme"):
        storage.check_url(url, "model.pretrained_path")
    with pytest.raises(storage.UnsupportedURL):
        storage.get_fs(url)
