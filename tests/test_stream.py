"""Streaming loader: rank/worker split, equal batch counts, skips, mixture, resume.

Shards are written directly in the docs/architecture.md §2 format (``shard_helpers.write_shards``)
so the tests depend neither on the synthetic generator nor on the model's processor.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from aov_dist.data.config import DataConfig, DatasetSpec
from aov_dist.data.decode import SampleError
from shard_helpers import (build_loader, cfg_for, collect, corrupt_member_header, ids_of, run_epoch,
                           write_shards)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_and_workers_split_the_epoch(tmp_path: Path, num_workers: int) -> None:
    # 57 samples over 2 ranks x 2 streams (or x1): equal ranges, the remainder dropped
    manifest, ids = write_shards(tmp_path, [10, 10, 10, 10, 10, 7])
    cfg = cfg_for(manifest, micro_batch_size=3, num_workers=num_workers, shuffle_buffer=5)
    per_rank, sizes = [], []
    for rank in range(2):
        loader = build_loader(cfg, rank, 2, transform=ids_of)
        batches = run_epoch(loader)
        sizes.append((len(batches), loader.batches_per_epoch))
        per_rank.append([x for b in batches for x in b])
        assert all(len(b) == 3 for b in batches)
        assert loader.epoch == 1 and loader.skipped == {}
    streams = max(1, num_workers)
    per_stream = 57 // (2 * streams)
    expect_batches = streams * (per_stream // 3)
    assert sizes == [(expect_batches, expect_batches)] * 2
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen)), "a sample was read by two ranks/workers"
    assert set(seen) <= set(ids)
    assert len(ids) - len(seen) == loader.info()["dropped_per_epoch"]
    # the order is shuffled, and the next epoch is a different shuffle of a different split
    assert per_rank[0] != sorted(per_rank[0])
    again = build_loader(cfg, 0, 2, transform=ids_of)
    epoch0 = [x for b in again for x in b]
    epoch1 = [x for b in again for x in b]
    assert epoch0 == per_rank[0]
    assert len(epoch1) == len(epoch0) and sorted(epoch1) != sorted(epoch0)


def test_bad_samples_never_make_a_rank_run_short(tmp_path: Path) -> None:
    # every third sample is bad: each stream must refill from its next / repeated samples
    bad = {i: "bad_image" for i in range(0, 40, 3)}
    manifest, _ = write_shards(tmp_path, [10, 10, 10, 10], kinds=bad)
    cfg = cfg_for(manifest, micro_batch_size=4, num_workers=2, shuffle_buffer=3)
    counts, skipped = [], 0
    for rank in range(2):
        loader = build_loader(cfg, rank, 2, transform=ids_of)
        batches = run_epoch(loader)
        assert all(len(b) == 4 for b in batches)
        assert not any(int(x[1:]) in bad for b in batches for x in b)
        counts.append(len(batches))
        skipped += loader.skipped["bad_image"]
    assert counts == [loader.batches_per_epoch] * 2 == [4, 4]
    assert skipped >= len(bad)


def test_same_seed_same_order_and_seed_changes_it(tmp_path: Path) -> None:
    manifest, _ = write_shards(tmp_path, [8, 8, 8])
    a = run_epoch(build_loader(cfg_for(manifest, num_workers=0, seed=3), 0, 1, transform=ids_of))
    b = run_epoch(build_loader(cfg_for(manifest, num_workers=0, seed=3), 0, 1, transform=ids_of))
    c = run_epoch(build_loader(cfg_for(manifest, num_workers=0, seed=4), 0, 1, transform=ids_of))
    assert a == b and a != c


def test_each_bad_kind_is_skipped_and_counted(tmp_path: Path) -> None:
    bad = {1: "bad_image", 2: "tiny_image", 3: "bad_json", 4: "image_count_mismatch"}
    manifest, ids = write_shards(tmp_path, [8], kinds=bad)
    # 4 good samples, quota 5 with buffer 1: the whole pass is read, then the refill pass's first
    # sample (s00000, good) tops the epoch up: every bad sample is met exactly once
    cfg = cfg_for(manifest, micro_batch_size=1, num_workers=0, shuffle_buffer=1,
                  samples_per_epoch=5)
    loader = build_loader(cfg, 0, 1, transform=ids_of)
    got = [x for b in run_epoch(loader) for x in b]
    assert got == ["s00000", "s00005", "s00006", "s00007", "s00000"]
    assert loader.skipped == {"bad_image": 1, "tiny_image": 1, "bad_json": 1,
                              "image_count_mismatch": 1}
    assert loader.batches_per_epoch == 5


@pytest.mark.parametrize("damage", ["header", "truncate"])
def test_corrupt_tar_counts_the_lost_samples(tmp_path: Path, damage: str) -> None:
    manifest, _ = write_shards(tmp_path, [4, 4])
    tar0 = tmp_path / "s-000000.tar"
    if damage == "header":
        corrupt_member_header(tar0, "000002.json")
    else:
        with tarfile.open(tar0) as tf:
            m = next(m for m in tf.getmembers() if m.name == "000002.img0.png")
        tar0.write_bytes(tar0.read_bytes()[:m.offset_data + 10])
    # 6 readable samples, quota 7: the full pass plus one sample of the refill pass (a good
    # one: with buffer 1 both shards start with good samples)
    cfg = cfg_for(manifest, micro_batch_size=1, num_workers=0, shuffle_buffer=1,
                  samples_per_epoch=7)
    loader = build_loader(cfg, 0, 1, transform=ids_of)
    got = [x for b in run_epoch(loader) for x in b]
    assert len(got) == 7 and "s00002" not in got and "s00003" not in got
    assert loader.skipped == {"corrupt_tar": 2}


@pytest.mark.parametrize("kind,num_workers", [("bad_image", 0), ("tiny_image", 0), ("bad_json", 0),
                                              ("image_count_mismatch", 0), ("bad_image", 1)])
def test_fail_mode_names_shard_and_key(tmp_path: Path, kind: str, num_workers: int) -> None:
    manifest, _ = write_shards(tmp_path, [3], kinds={1: kind})
    cfg = cfg_for(manifest, micro_batch_size=1, num_workers=num_workers, shuffle_buffer=1,
                  on_error="fail")
    with pytest.raises(SampleError) as e:
        run_epoch(build_loader(cfg, 0, 1, transform=ids_of))
    # also when raised in a DataLoader worker (torch rebuilds it from the message text)
    assert (e.value.reason, e.value.url, e.value.key) == (kind, str(tmp_path / "s-000000.tar"),
                                                          "000001")
    assert str(tmp_path / "s-000000.tar") in str(e.value) and "'000001'" in str(e.value)


def test_fail_mode_corrupt_tar_names_shard(tmp_path: Path) -> None:
    manifest, _ = write_shards(tmp_path, [4])
    corrupt_member_header(tmp_path / "s-000000.tar", "000002.json")
    cfg = cfg_for(manifest, micro_batch_size=1, num_workers=0, shuffle_buffer=1, on_error="fail")
    with pytest.raises(SampleError, match=r"corrupt_tar: shard .*s-000000\.tar sample "
                                          r"'#2': sample lost, reading stopped at key '000002': "
                                          r"tar ended after 3 of 4 samples"):
        run_epoch(build_loader(cfg, 0, 1, transform=ids_of))


class TooLong(Exception):
    pass


def test_too_long_samples_are_dropped_and_counted(tmp_path: Path) -> None:
    manifest, _ = write_shards(tmp_path, [6])

    def transform(s: dict) -> str:
        if s["id"] in ("s00001", "s00004"):
            raise TooLong("729 image tokens > max_length 100")
        return s["id"]

    cfg = cfg_for(manifest, micro_batch_size=2, num_workers=0, shuffle_buffer=1,
                  samples_per_epoch=4)
    loader = build_loader(cfg, 0, 1, transform=transform, too_long_exceptions=(TooLong,))
    got = [x for b in run_epoch(loader) for x in b]
    assert got == ["s00000", "s00002", "s00003", "s00005"]
    assert loader.skipped == {"too_long": 2}
    # any other transform error is a bug and is raised with the sample named
    with pytest.raises(RuntimeError, match=r"transform failed on shard .* sample '000001'"):
        run_epoch(build_loader(cfg, 0, 1, transform=transform))


def test_stage1_keeps_labelled_single_images(tmp_path: Path) -> None:
    labels = {0: 1, 1: None, 2: 0, 3: 1, 4: None, 5: 0}
    manifest, _ = write_shards(tmp_path, [6], labels=labels, views={3: 4})
    cfg = cfg_for(manifest, micro_batch_size=1, num_workers=0, shuffle_buffer=1)
    loader = build_loader(cfg, 0, 1, stage="stage1",
                          transform=lambda s: (s["id"], s["label"], len(s["images"])))
    got = [x for b in run_epoch(loader) for x in b]
    # labelled share in the manifest = 4/6 -> 4 per epoch; s00003 (4 views) is filtered too,
    # so the epoch is topped up from the refill pass (starting again at s00000)
    assert got == [("s00000", 1, 1), ("s00002", 0, 1), ("s00005", 0, 1), ("s00000", 1, 1)]
    assert loader.filtered == {"unlabelled": 2, "multi_view": 1}
    assert loader.skipped == {}


def test_mixture_follows_weights(tmp_path: Path) -> None:
    ma, _ = write_shards(tmp_path / "a", [20, 20], prefix="a")
    mb, _ = write_shards(tmp_path / "b", [20, 20], prefix="b")
    cfg = DataConfig(datasets=[DatasetSpec("a", ma, 3.0), DatasetSpec("b", mb, 1.0)],
                     micro_batch_size=4, num_workers=0, samples_per_epoch=400, seed=1)
    got = [x for b in run_epoch(build_loader(cfg, 0, 1, transform=ids_of)) for x in b]
    assert len(got) == 400
    n_a = sum(x.startswith("a") for x in got)
    # binomial(400, 0.75): sd 8.7; 4 sd tolerance
    assert abs(n_a - 300) < 35, n_a
    # dataset a is drawn ~300 times from 40 samples: it cycles through refill passes
    assert len(set(x for x in got if x.startswith("a"))) == 40


@pytest.mark.parametrize("num_workers,stop", [(0, (0, 2)), (2, (0, 4)), (2, (1, 1)), (2, (0, 5))])
def test_resume_mid_epoch_continues_exactly(tmp_path: Path, num_workers: int, stop) -> None:
    manifest, _ = write_shards(tmp_path, [9, 9, 9, 9, 5], kinds={7: "bad_image", 20: "bad_json"})
    cfg = cfg_for(manifest, micro_batch_size=2, num_workers=num_workers, shuffle_buffer=4)
    full, _ = collect(build_loader(cfg, 1, 2, transform=ids_of), 2)
    first, state = collect(build_loader(cfg, 1, 2, transform=ids_of), 2, stop)
    assert state is not None and len(first) < len(full)
    resumed = build_loader(cfg, 1, 2, transform=ids_of, state=state)
    rest, _ = collect(resumed, 2)
    assert first + rest == full
    assert resumed.epoch == 2


def test_resume_mixture_restores_every_stream(tmp_path: Path) -> None:
    ma, _ = write_shards(tmp_path / "a", [7, 7], prefix="a", kinds={3: "tiny_image"})
    mb, _ = write_shards(tmp_path / "b", [5], prefix="b")
    cfg = DataConfig(datasets=[DatasetSpec("a", ma, 1.0), DatasetSpec("b", mb, 2.0)],
                     micro_batch_size=3, num_workers=2, samples_per_epoch=36, shuffle_buffer=3)
    full, _ = collect(build_loader(cfg, 0, 1, transform=ids_of), 2)
    first, state = collect(build_loader(cfg, 0, 1, transform=ids_of), 2, (0, 3))
    assert [len(w["streams"]) for w in state["workers"]] == [2, 2]
    rest, _ = collect(build_loader(cfg, 0, 1, transform=ids_of, state=state), 2)
    assert first + rest == full


def test_state_from_another_setup_is_refused(tmp_path: Path) -> None:
    manifest, _ = write_shards(tmp_path, [10, 10])
    cfg = cfg_for(manifest, num_workers=0)
    state = build_loader(cfg, 0, 2, transform=ids_of).state_dict()
    with pytest.raises(ValueError, match="world_size=2 but this loader has 1"):
        build_loader(cfg, 0, 1, transform=ids_of, state=state)


def test_too_few_samples_for_the_streams_is_a_clear_error(tmp_path: Path) -> None:
    manifest, _ = write_shards(tmp_path, [3])
    with pytest.raises(ValueError, match=r"dataset 'd' .*3 samples is fewer than ranks x workers = 4"):
        build_loader(cfg_for(manifest, num_workers=2), 0, 2)


def test_accepts_the_hydra_data_node(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    manifest, _ = write_shards(tmp_path, [6, 6])
    node = OmegaConf.create({"datasets": [{"name": "d", "manifest": manifest}],
                             "num_workers": 0, "micro_batch_size": 3})
    from_node = run_epoch(build_loader(node, 0, 1, transform=ids_of))
    from_dataclass = run_epoch(build_loader(cfg_for(manifest, num_workers=0, micro_batch_size=3),
                                            0, 1, transform=ids_of))
    assert from_node == from_dataclass and len(from_node) == 4
    with pytest.raises(ValueError, match=r"data.on_error: must be one of"):
        build_loader(OmegaConf.merge(node, {"on_error": "ignore"}), 0, 1)


def test_stage1_refuses_a_dataset_without_labels(tmp_path: Path) -> None:
    manifest, _ = write_shards(tmp_path, [4], labels={i: None for i in range(4)})
    with pytest.raises(ValueError, match=r"dataset 'd' .*no labelled samples"):
        build_loader(cfg_for(manifest, num_workers=0), 0, 1, stage="stage1")


def test_spawned_workers_give_the_same_batches(tmp_path: Path) -> None:
    manifest, _ = write_shards(tmp_path, [6, 6])
    fork = cfg_for(manifest, micro_batch_size=2, num_workers=1)
    spawn = cfg_for(manifest, micro_batch_size=2, num_workers=1, mp_context="spawn")
    assert run_epoch(build_loader(spawn, 0, 1, transform=ids_of)) == \
        run_epoch(build_loader(fork, 0, 1, transform=ids_of))
