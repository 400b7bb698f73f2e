"""S3 trouble: the endpoint goes away while shards stream (reads retry with backoff and go on with
exactly the samples an undisturbed read gives) and while a checkpoint uploads (the step fails with
an error naming the target; nothing gets a COMMITTED marker; the previous checkpoint stays).

The outage is real: a TCP proxy in front of the moto server refuses connections and cuts the
open ones while it is "down" (moto itself keeps its in-memory buckets).
"""
from __future__ import annotations

import socket
import threading

import pytest

from aov_dist import storage
from aov_dist.data import reader as reader_mod
from aov_dist.data.plan import MAIN, REFILL, DatasetLanePlan
from aov_dist.data.shard_inspect import iter_shard
from aov_dist.train import checkpoint as ckpt
from aov_dist.train import checkpointing
from shard_helpers import build_loader, cfg_for
from train_harness import free_port, job_cfg, save_checkpoint


class FlakyProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>; ``down()`` closes the listener and cuts every live
    connection (clients see refused / reset connections), ``up()`` listens on the same port again."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener = None
        self.up()

    def up(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.1)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while self._listener is sock:
            try:
                client, _ = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def down(self) -> None:
        sock, self._listener = self._listener, None
        sock.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture
def proxy(s3_server, monkeypatch):
    p = FlakyProxy(int(s3_server.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.url)
    yield p
    if p._listener is None:
        p.up()


def _ids(loader) -> list[str]:
    return [x for batch in loader for x in batch]


def _loader(manifest: str, transform=lambda s: s["id"]):
    # blocks of 64: each shard of the synthetic data (about 8 samples) is one block, read when its
    # first sample is due: the reads stay lazy shard by shard (the outage test needs a read after
    # its third sample) and each shard is opened once (the retry test counts the opens)
    loader = build_loader(cfg_for(manifest, micro_batch_size=1, num_workers=0, block_size=64), 0, 1,
                          transform=transform)
    assert all(n <= 64 for n in (s.samples for s in loader.settings.indexes[0].shards))
    return loader


# ---- reads: fast tests with a storage that fails, then the real outage ----

class _BreaksOnce:
    """A file whose read raises a connection error once, after ``after`` bytes."""

    def __init__(self, raw, after: int, state: dict):
        self.raw, self.after, self.state, self.n = raw, after, state, 0

    def read(self, n: int = -1) -> bytes:
        if not self.state["broken"] and self.n >= self.after:
            self.state["broken"] = True
            raise ConnectionResetError("connection reset by peer")
        data = self.raw.read(n if n >= 0 else -1)
        self.n += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()


def test_read_interrupted_mid_shard_retries_and_hands_out_the_same_samples(synthetic_shards, monkeypatch, caplog):
    manifest = str(synthetic_shards.manifest_path)
    expected = _ids(_loader(manifest))
    real_open = storage.open_url
    second = synthetic_shards.manifest["shards"][1]["url"]
    state = {"broken": False, "opens": 0}

    def flaky_open(url, mode="rb", endpoint_url=None):
        f = real_open(url, mode, endpoint_url)
        if url.endswith(second):
            state["opens"] += 1
            return _BreaksOnce(f, after=20000, state=state)  # a few samples into the shard
        return f

    monkeypatch.setattr(storage, "open_url", flaky_open)
    monkeypatch.setattr(reader_mod, "READ_BACKOFF_S", 0.01)
    loader = _loader(manifest)
    assert _ids(loader) == expected and loader.skipped == {}
    assert state == {"broken": True, "opens": 2}
    assert "read failed after" in caplog.text and second in caplog.text


def test_lasting_outage_fails_naming_the_shard_instead_of_skipping(synthetic_shards, monkeypatch):
    manifest = str(synthetic_shards.manifest_path)
    real_open = storage.open_url
    calls = []

    def dead_open(url, mode="rb", endpoint_url=None):
        if url.endswith(".tar"):
            calls.append(url)
            raise ConnectionRefusedError(111, "Connection refused")
        return real_open(url, mode, endpoint_url)

    monkeypatch.setattr(storage, "open_url", dead_open)
    monkeypatch.setattr(reader_mod, "READ_BACKOFF_S", 0.01)
    with pytest.raises(OSError, match=r"shard .*\.tar: storage unreachable after 5 attempts"):
        _ids(_loader(manifest))
    assert len(calls) == reader_mod.READ_ATTEMPTS and len(set(calls)) == 1


def test_missing_shard_is_still_counted_as_corrupt_not_retried(tmp_path, synthetic_shards, monkeypatch):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(synthetic_shards.dir, copy)
    first = synthetic_shards.manifest["shards"][0]
    lost = {s.meta["id"] for s in iter_shard(str(copy / first["url"]))}
    (copy / first["url"]).unlink()
    monkeypatch.setattr(reader_mod, "READ_BACKOFF_S", 60.0)  # a retry would make this test hang
    loader = _loader(str(copy / "manifest.json"))
    got = _ids(loader)
    # every place of the epoch holds a good sample; each read of a lost sample counts once: all of
    # them in the epoch's own order, and those a replacement meets again
    assert len(got) == loader.batches_per_epoch and not lost & set(got)
    reads = _reads_of_shard(loader, 0)
    assert loader.skipped == {"corrupt_tar": reads} and reads >= first["samples"] == len(lost)


def _reads_of_shard(loader, shard: int) -> int:
    """Reads of a shard's samples in epoch 0 of a one-lane loader with micro-batches of 1 when that
    shard's samples are all bad and the others good, by the reader's rule (reader.py): a
    micro-batch reads its span of the main order, then, with no good sample there, the refill
    order from twice its span's start until a good one."""
    s, plan = loader.settings, loader.settings.plan
    assert (plan.lanes, plan.micro_batch_size, len(s.indexes)) == (1, 1, 1)
    main, refill = (DatasetLanePlan(s.blocks[0], s.indexes[0].total, s.seed, kind, 0, 0, 0, 1)
                    for kind in (MAIN, REFILL))
    reads = 0
    for g in range(plan.global_batches):
        lo, hi = plan.span(g)
        bad = sum(main.place(q).shard == shard for q in range(lo, hi))
        reads += bad
        q = 2 * lo
        while bad == hi - lo and refill.place(q).shard == shard:
            reads, q = reads + 1, q + 1
    return reads


class _Watched:
    """A shard file whose every read goes through ``record`` (which notes whether it met the outage)."""

    def __init__(self, raw, record):
        self.raw, self.record = raw, record

    def read(self, n: int = -1) -> bytes:
        return self.record(lambda: self.raw.read(n))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()


def test_s3_endpoint_down_for_seconds_while_streaming(synthetic_shards, s3_bucket, proxy, monkeypatch):
    storage.copy_from_local(str(synthetic_shards.dir), f"{s3_bucket}/shards")
    manifest = f"{s3_bucket}/shards/manifest.json"
    expected = _ids(_loader(manifest))
    assert len(expected) == synthetic_shards.manifest["totals"]["samples"]
    monkeypatch.setattr(reader_mod, "READ_BACKOFF_S", 0.5)
    down, restored = threading.Event(), threading.Event()  # the endpoint went away / came back

    def back_up() -> None:
        proxy.up()
        restored.set()

    hit = []  # storage calls (shard opens and reads) begun while S3 was down that failed or waited for it

    def record(call):
        during = down.is_set() and not restored.is_set()
        try:
            out = call()
        except Exception:
            hit.append(during)
            raise
        hit.append(during and restored.is_set())
        return out

    real_open = storage.open_url

    def watched_open(url, mode="rb", endpoint_url=None):
        f = record(lambda: real_open(url, mode, endpoint_url))
        return _Watched(f, record) if url.endswith(".tar") else f

    monkeypatch.setattr(storage, "open_url", watched_open)
    seen, after_outage = [], []

    def transform(s):
        seen.append(s["id"])
        if restored.is_set():
            after_outage.append(s["id"])
        if len(seen) == 3:  # after the first shard's first samples: 8 s without S3
            proxy.down()
            down.set()
            threading.Timer(8.0, back_up).start()
        return s["id"]

    loader = _loader(manifest, transform)
    assert _ids(loader) == expected and loader.skipped == {}
    # it really waited for the endpoint: a shard open or read met the outage (it failed and was
    # retried, or it returned only once S3 was back), and samples read after S3 came back followed
    assert any(hit), hit
    assert after_outage


# ---- checkpoint upload ----

@pytest.mark.slow
def test_upload_that_keeps_failing_fails_the_step_and_keeps_the_previous_checkpoint(s3_bucket, proxy, monkeypatch):
    cfg = job_cfg(f"{s3_bucket}/runs", keep=1)
    assert save_checkpoint(cfg, 2) == f"{s3_bucket}/runs/run/step_2"
    assert ckpt.is_committed(f"{s3_bucket}/runs/run/step_2")
    monkeypatch.setattr(storage, "WRITE_ATTEMPTS", 2)  # botocore's retries of each request: keep it short
    proxy.down()
    with pytest.raises(RuntimeError, match=r"checkpoint s3://.*/runs/run/step_4: rank 0 could not upload its "
                                           r"part .*each request was tried 2 times\); the step is not committed"):
        save_checkpoint(cfg, 4)
    proxy.up()
    assert not storage.exists(f"{s3_bucket}/runs/run/step_4/{ckpt.COMMIT_MARKER}")
    assert ckpt.latest_committed(f"{s3_bucket}/runs", "run") == f"{s3_bucket}/runs/run/step_2"
    assert storage.exists(f"{s3_bucket}/runs/run/step_2/trainer_state.json")  # not pruned


def test_upload_survives_a_short_outage(s3_bucket, proxy, monkeypatch):
    cfg = job_cfg(f"{s3_bucket}/runs", keep=1)
    real_put = checkpointing.upload_part
    calls = []

    def upload(local, final, rank):  # S3 goes away just as the upload starts, for 2 s
        calls.append(final)
        proxy.down()
        threading.Timer(2.0, proxy.up).start()
        real_put(local, final, rank)

    monkeypatch.setattr(checkpointing, "upload_part", upload)
    assert save_checkpoint(cfg, 2) == f"{s3_bucket}/runs/run/step_2"
    assert ckpt.is_committed(f"{s3_bucket}/runs/run/step_2") and len(calls) == 1
    assert storage.exists(f"{s3_bucket}/runs/run/step_2/hf/model.safetensors")
