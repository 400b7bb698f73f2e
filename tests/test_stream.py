"""Streaming loader: one order for every layout (ranks x DataLoader workers), global batches, bad
samples and their replacements, stage-1 filters, mixtures, resume on another world size, state.

Shards are written directly in the docs/architecture.md §2 format (``shard_helpers.write_shards``)
so the tests depend neither on the synthetic generator nor on the model's processor.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from aov_dist.data.config import DataConfig, DatasetSpec
from aov_dist.data.decode import SampleError
from aov_dist.data.plan import MAIN, DatasetLanePlan
from shard_helpers import (build_loader, cfg_for, corrupt_member_header, ids_of, layout_steps, rank_batches,
                           run_epoch, states_after, write_shards)

SIZES = [13, 11, 17, 9, 16, 14]  # 80 samples: 6 global batches of 12 per epoch
# (ranks, DataLoader workers); with global batch 12 and micro-batch 1 accum is 12 / ranks, so some
# worker counts divide it (each lane read by one worker) and some do not (workers share lanes)
LAYOUTS = [(1, 0), (1, 2), (2, 1), (3, 0), (3, 2), (4, 0), (4, 1), (4, 2), (6, 0)]
BAD = {3: "bad_image", 17: "bad_json", 18: "tiny_image", 40: "image_count_mismatch", 66: "bad_image"}


def _flat(steps: list[list[list]]) -> list:
    return [x for step in steps for mb in step for x in mb]


def _summed(loaders, attr: str = "skipped") -> dict[str, int]:
    out: dict[str, int] = {}
    for loader in loaders:
        for k, v in getattr(loader, attr).items():
            out[k] = out.get(k, 0) + v
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    good, ids = write_shards(tmp_path_factory.mktemp("good"), SIZES)
    bad, _ = write_shards(tmp_path_factory.mktemp("bad"), SIZES, kinds=BAD)
    return {"good": good, "bad": bad, "ids": ids}


@pytest.mark.parametrize("micro", [1, 2])
@pytest.mark.parametrize("data", ["good", "bad"])
def test_every_layout_sees_the_same_micro_batches_in_every_step(shards, data: str, micro: int) -> None:
    def run(world: int, workers: int):
        cfg = cfg_for(shards[data], micro_batch_size=micro, num_workers=workers, block_size=4)
        return layout_steps(cfg, world, 12, epochs=2)

    ref, ref_loaders = run(1, 0)
    assert len(ref) == 2 * 6 and all(len(step) == 12 // micro and all(len(mb) == micro for mb in step)
                                     for step in ref)
    layouts = [(w, n) for w, n in LAYOUTS[1:] if 12 % (w * micro) == 0]
    assert len(layouts) >= (8 if micro == 1 else 4)
    for world, workers in layouts:
        steps, loaders = run(world, workers)
        assert steps == ref, (world, workers)
        # bad samples replaced alike, and counted alike once summed over the ranks
        assert _summed(loaders) == _summed(ref_loaders), (world, workers)
        assert [loader.epoch for loader in loaders] == [2] * world
    ids = _flat(ref)
    if data == "bad":
        assert _summed(ref_loaders).keys() == {"bad_image", "bad_json", "tiny_image", "image_count_mismatch"}
        assert not {f"s{i:05d}" for i in BAD} & set(ids)
    # shuffled, and another shuffle in the next epoch
    assert ids[:72] != sorted(ids[:72]) and ids[:72] != ids[72:]


def test_mixture_and_stage1_orders_do_not_depend_on_the_layout(tmp_path: Path) -> None:
    labels = {i: (None if i % 4 == 0 else i % 2) for i in range(60)}
    ma, _ = write_shards(tmp_path / "a", [20, 20, 20], prefix="a", labels=labels, views={5: 3})
    mb, _ = write_shards(tmp_path / "b", [15, 15], prefix="b", kinds={7: "bad_json"})
    cfg = DataConfig(datasets=[DatasetSpec("a", ma, 2.0), DatasetSpec("b", mb, 1.0)], micro_batch_size=2,
                     num_workers=0, block_size=5, samples_per_epoch=48)
    ref, ref_loaders = layout_steps(cfg, 1, 12, stage="stage1")
    for world, workers in [(2, 1), (3, 2), (6, 0)]:
        cfg.num_workers = workers
        steps, loaders = layout_steps(cfg, world, 12, stage="stage1")
        assert steps == ref
        assert _summed(loaders, "filtered") == _summed(ref_loaders, "filtered")
    assert len(ref) == 4 and {x[0] for x in _flat(ref)} == {"a", "b"}
    assert set(_summed(ref_loaders, "filtered")) <= {"unlabelled", "multi_view"}


def test_an_epoch_reads_every_sample_at_most_once_exactly_at_its_planned_places(shards) -> None:
    cfg = cfg_for(shards["good"], micro_batch_size=2, num_workers=0, block_size=3)
    steps, loaders = layout_steps(cfg, 2, 8)
    loader, ids = loaders[0], shards["ids"]
    plan, s = loader.settings.plan, loader.settings
    assert (plan.lanes, plan.global_batches, len(steps)) == (4, 10, 10)
    first = [sum(SIZES[:i]) for i in range(len(SIZES))]  # global index of each shard's member 0
    lanes = [DatasetLanePlan(s.blocks[0], 80, s.seed, MAIN, 0, 0, u, plan.lanes) for u in range(plan.lanes)]
    planned = []
    for g in range(plan.global_batches):
        lo, hi = plan.span(g)
        assert hi - lo == plan.micro_batch_size  # every sample usable: spans of one micro-batch
        for u in range(plan.lanes):
            planned.append([ids[first[lanes[u].place(q).shard] + lanes[u].place(q).member] for q in range(lo, hi)])
    seen = _flat(steps)
    assert [mb for step in steps for mb in step] == planned
    assert len(seen) == len(set(seen)) == 80 and loader.info()["dropped_per_epoch"] == 0


def _summed_states(states: list[dict], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for state in states:
        for k, v in state[key].items():
            out[k] = out.get(k, 0) + v
    return out


@pytest.mark.parametrize("data", ["good", "bad"])
def test_resume_on_another_world_size_continues_the_job_exactly(shards, data: str) -> None:
    """A job stopped after 4 of its steps on 4 ranks goes on on M ranks as the training loop resumes
    it: every new rank loads rank 0's state (any other rank's does as well), rank 0 is handed the
    job's counts. The steps that follow are exactly the uninterrupted job's, and so are the counts
    summed over the ranks at the end. On the same world size each rank loads its own state."""
    cfg = cfg_for(shards[data], micro_batch_size=1, num_workers=0, block_size=4)
    full, full_loaders = layout_steps(cfg, 4, 12, epochs=2)
    states = states_after(cfg, 4, 12, steps=4)  # inside epoch 0 (6 steps per epoch)
    assert {(s["epoch"], s["global_batches_done"]) for s in states} == {(0, 4)}
    job = (_summed_states(states, "skipped"), _summed_states(states, "filtered"))
    assert bool(job[0]) == (data == "bad")
    for world, workers, source in [(2, 0, 0), (3, 2, 0), (1, 1, 0), (6, 1, 0), (2, 1, 3), (4, 0, None)]:
        cfg.num_workers = workers
        if source is None:  # same world size: each rank its own state, its own counts
            rest, loaders = layout_steps(cfg, world, 12, epochs=2, states=states)
        else:
            rest, loaders = layout_steps(cfg, world, 12, epochs=2, states=[states[source]] * world,
                                         counts_before=job)
        assert rest == full[4:], (world, workers, source)
        assert _summed(loaders) == _summed(full_loaders), (world, workers, source)
        assert _summed(loaders, "filtered") == _summed(full_loaders, "filtered") == {}
        assert [loader.epoch for loader in loaders] == [2] * world


def test_counts_travel_with_the_own_rank_and_set_counts_before_sets_the_base(shards) -> None:
    cfg = cfg_for(shards["bad"], micro_batch_size=1, num_workers=0, block_size=4)
    states = states_after(cfg, 2, 12, steps=6)  # the whole of epoch 0
    assert sum(sum(s["skipped"].values()) for s in states) >= len(BAD)
    own = build_loader(cfg, 1, 2, transform=ids_of, global_batch_size=12, state=states[1])
    assert own.skipped == states[1]["skipped"] and own.epoch == 1
    other = build_loader(cfg, 0, 3, transform=ids_of, global_batch_size=12, state=states[1])
    assert other.skipped == {} and other.filtered == {}
    other.set_counts_before({"bad_json": 5}, {"unlabelled": 2})
    rank_batches(other, 2)
    assert other.skipped["bad_json"] >= 5 and other.filtered == {"unlabelled": 2}


@pytest.mark.parametrize("change,message", [
    ({"global_batch_size": 6}, r"global_batch_size=12 but this loader has 6: set stage.global_batch_size"),
    ({"seed": 4}, r"seed=0 but this loader has 4: set data.seed"),
    ({"micro_batch_size": 2}, r"micro_batch_size=1 but this loader has 2: set data.micro_batch_size"),
    ({"block_size": 8}, r"block_size=4 but this loader has 8: set data.block_size"),
    ({"stage": "stage1"}, r"stage='stage2' but this loader has 'stage1': set stage "),
    ({"dataset": "other"}, r"datasets=\[\{'name': 'd'.* set data.datasets"),
])
def test_a_state_of_another_order_is_refused_naming_the_key(shards, change: dict, message: str) -> None:
    cfg = cfg_for(shards["good"], micro_batch_size=1, num_workers=0, block_size=4)
    state = states_after(cfg, 2, 12, steps=1)[0]
    kw = {"global_batch_size": change.get("global_batch_size", 12), "stage": change.get("stage", "stage2")}
    cfg = cfg_for(shards["good"], micro_batch_size=change.get("micro_batch_size", 1), num_workers=0,
                  block_size=change.get("block_size", 4), seed=change.get("seed", 0))
    if "dataset" in change:
        cfg.datasets = [DatasetSpec(change["dataset"], shards["good"], 1.0)]
    with pytest.raises(ValueError, match=message):
        build_loader(cfg, 0, 1, state=state, **kw)


def test_states_inside_a_global_batch_or_of_an_older_format_are_refused(shards) -> None:
    cfg = cfg_for(shards["good"], micro_batch_size=1, num_workers=0)
    loader = build_loader(cfg, 0, 2, transform=ids_of, global_batch_size=12)
    rank_batches(loader, 1, limit=4)  # 4 of the 6 micro-batches of a step
    with pytest.raises(ValueError, match="inside a global batch of 6: take it after an optimizer step"):
        loader.state_dict()
    with pytest.raises(ValueError, match="loader state version 1, expected 2"):
        build_loader(cfg, 0, 2, global_batch_size=12, state={"version": 1, "world_size": 2})


def test_a_state_taken_on_an_epochs_last_step_leaves_the_open_epoch_alone(shards) -> None:
    """The training loop checkpoints after the step that ends an epoch while that epoch's iterator
    is still open (it ends on the next read): the state is the next epoch's start, and both the
    open epoch and the next one run on exactly as without the checkpoint."""
    cfg = cfg_for(shards["good"], micro_batch_size=1, num_workers=0, block_size=4)
    plain = build_loader(cfg, 0, 2, transform=ids_of, global_batch_size=12)
    want = rank_batches(plain, 2)
    loader = build_loader(cfg, 0, 2, transform=ids_of, global_batch_size=12)
    batches, got = iter(loader), []
    for _ in range(loader.batches_per_epoch):
        got.append(list(next(batches)))
    state = loader.state_dict()
    assert (state["epoch"], state["global_batches_done"]) == (1, 0)
    assert loader.epoch == 0  # taking the state changed nothing
    with pytest.raises(StopIteration):
        next(batches)
    assert loader.epoch == 1
    got += rank_batches(loader, 2)
    assert got == want
    resumed = build_loader(cfg, 0, 2, transform=ids_of, global_batch_size=12, state=state)
    assert rank_batches(resumed, 2) == want[loader.batches_per_epoch:]


def test_reads_stay_shard_local(shards) -> None:
    """Each lane walks its own contiguous range of the block order: a rank opens a shard once per
    block of its lanes' ranges at most (fewer when the next block continues the same shard), never
    the other ranks' blocks; all ranks together open each block once, plus the blocks a lane
    boundary cuts in two."""
    cfg = cfg_for(shards["good"], micro_batch_size=2, num_workers=0, block_size=4)
    total_blocks = sum(-(-n // 4) for n in SIZES)
    opens_total = 0
    for rank in range(4):
        loader = build_loader(cfg, rank, 4, transform=ids_of, global_batch_size=8)
        urls: list[str] = []
        real = loader.settings.open_url
        loader.settings.open_url = lambda url: urls.append(url) or real(url)
        run_epoch(loader)
        s, plan = loader.settings, loader.settings.plan
        lane = DatasetLanePlan(s.blocks[0], 80, s.seed, MAIN, 0, 0, rank, plan.lanes)  # accum 1: lane = rank
        blocks = {lane.place(q).block for q in range(plan.lane_positions)}
        assert len(urls) <= len(blocks) < total_blocks // 2, (rank, urls)
        opens_total += len(urls)
    assert opens_total <= total_blocks + plan.lanes - 1


class _CountingOpener:
    """``open_url`` that logs every URL it opens to a file (DataLoader workers append to it too)."""

    def __init__(self, real, log: Path):
        self.real, self.log = real, log

    def __call__(self, url: str):
        with open(self.log, "a") as f:
            f.write(url + "\n")
        return self.real(url)


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 2), (2, 2)])
def test_reads_stay_shard_local_with_dataloader_workers(shards, tmp_path: Path, world: int, workers: int) -> None:
    """When the workers divide a rank's micro-batch places each lane is read by one worker: all
    ranks and workers together open each block once, plus the blocks a lane boundary cuts in two."""
    cfg = cfg_for(shards["good"], micro_batch_size=2, num_workers=workers, block_size=4)
    total_blocks = sum(-(-n // 4) for n in SIZES)
    log = tmp_path / "opens.txt"
    log.touch()
    for rank in range(world):
        loader = build_loader(cfg, rank, world, transform=ids_of, global_batch_size=8)
        assert loader.accum % workers == 0
        loader.settings.open_url = _CountingOpener(loader.settings.open_url, log)
        assert len(run_epoch(loader)) == loader.batches_per_epoch
    opens = log.read_text().split()
    assert 0 < len(opens) <= total_blocks + loader.settings.plan.lanes - 1, len(opens)


def test_each_bad_kind_is_skipped_and_counted(tmp_path: Path) -> None:
    bad = {1: "bad_image", 2: "tiny_image", 3: "bad_json", 4: "image_count_mismatch"}
    manifest, _ = write_shards(tmp_path, [8], kinds=bad)
    loader = build_loader(cfg_for(manifest, micro_batch_size=1, num_workers=0), 0, 1, transform=ids_of)
    got = [x for b in run_epoch(loader) for x in b]
    # every place of the epoch holds a good sample: the 4 bad ones are replaced by good ones
    assert len(got) == loader.batches_per_epoch == 8
    assert set(got) == {"s00000", "s00005", "s00006", "s00007"}
    assert set(loader.skipped) == {"bad_image", "tiny_image", "bad_json", "image_count_mismatch"}


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
    loader = build_loader(cfg_for(manifest, micro_batch_size=1, num_workers=0, block_size=2), 0, 1,
                          transform=ids_of)
    got = [x for b in run_epoch(loader) for x in b]
    assert len(got) == 8 and "s00002" not in got and "s00003" not in got
    assert set(loader.skipped) == {"corrupt_tar"} and loader.skipped["corrupt_tar"] >= 2


@pytest.mark.parametrize("kind,num_workers", [("bad_image", 0), ("tiny_image", 0), ("bad_json", 0),
                                              ("image_count_mismatch", 0), ("bad_image", 1)])
def test_fail_mode_names_shard_and_key(tmp_path: Path, kind: str, num_workers: int) -> None:
    manifest, _ = write_shards(tmp_path, [3], kinds={1: kind})
    cfg = cfg_for(manifest, micro_batch_size=1, num_workers=num_workers, on_error="fail")
    with pytest.raises(SampleError) as e:
        run_epoch(build_loader(cfg, 0, 1, transform=ids_of))
    # also when raised in a DataLoader worker (torch rebuilds it from the message text)
    assert (e.value.reason, e.value.url, e.value.key) == (kind, str(tmp_path / "s-000000.tar"), "000001")
    assert str(tmp_path / "s-000000.tar") in str(e.value) and "'000001'" in str(e.value)


def test_fail_mode_corrupt_tar_names_shard(tmp_path: Path) -> None:
    manifest, _ = write_shards(tmp_path, [4])
    corrupt_member_header(tmp_path / "s-000000.tar", "000002.json")
    cfg = cfg_for(manifest, micro_batch_size=1, num_workers=0, on_error="fail")
    with pytest.raises(SampleError, match=r"corrupt_tar: shard .*s-000000\.tar sample '#[23]': sample lost, "
                                          r"reading stopped at key '000002': tar ended after 3 of 4 samples"):
        run_epoch(build_loader(cfg, 0, 1, transform=ids_of))


class TooLong(Exception):
    pass


def test_too_long_samples_are_dropped_and_counted(tmp_path: Path) -> None:
    manifest, _ = write_shards(tmp_path, [6])

    def transform(s: dict) -> str:
        if s["id"] in ("s00001", "s00004"):
            raise TooLong("729 image tokens > max_length 100")
        return s["id"]

    cfg = cfg_for(manifest, micro_batch_size=2, num_workers=0)
    loader = build_loader(cfg, 0, 1, transform=transform, too_long_exceptions=(TooLong,))
    got = [x for b in run_epoch(loader) for x in b]
    assert len(got) == 6 and set(got) == {"s00000", "s00002", "s00003", "s00005"}
    assert set(loader.skipped) == {"too_long"} and loader.skipped["too_long"] >= 2
    # any other transform error is a bug and is raised with the sample named
    with pytest.raises(RuntimeError, match=r"transform failed on shard .* sample '00000[14]'"):
        run_epoch(build_loader(cfg, 0, 1, transform=transform))


def test_stage1_keeps_labelled_single_images(tmp_path: Path) -> None:
    labels = {0: 1, 1: None, 2: 0, 3: 1, 4: None, 5: 0}
    manifest, _ = write_shards(tmp_path, [6], labels=labels, views={3: 4})
    loader = build_loader(cfg_for(manifest, micro_batch_size=1, num_workers=0), 0, 1, stage="stage1",
                          transform=lambda s: (s["id"], s["label"], len(s["images"])))
    got = [x for b in run_epoch(loader) for x in b]
    # the manifest counts 4 labelled samples: 4 per epoch, read from spans of 1.5 samples on
    # average; s00003 (4 views) is filtered too, so at least one place takes a refill
    assert len(got) == loader.batches_per_epoch == 4
    assert set(got) <= {("s00000", 1, 1), ("s00002", 0, 1), ("s00005", 0, 1)}
    assert set(loader.filtered) == {"unlabelled", "multi_view"} and loader.filtered["unlabelled"] >= 2
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
    # dataset a is drawn ~300 times from 40 samples: it cycles through its passes
    assert len(set(x for x in got if x.startswith("a"))) == 40


def test_sizes_that_cannot_make_a_global_batch_are_clear_errors(tmp_path: Path) -> None:
    manifest, _ = write_shards(tmp_path, [3])
    with pytest.raises(ValueError, match=r"dataset 'd' .*3 samples is fewer than the micro-batch places of a "
                                         r"global batch \(global_batch_size / micro_batch_size = 4\)"):
        build_loader(cfg_for(manifest, micro_batch_size=1, num_workers=0), 0, 2, global_batch_size=4)
    with pytest.raises(ValueError, match=r"3 usable samples \(stage2\), fewer than one global batch "
                                         r"\(stage.global_batch_size=4\)"):
        build_loader(cfg_for(manifest, micro_batch_size=2, num_workers=0), 0, 2)
    with pytest.raises(ValueError, match=r"stage.global_batch_size: 6 is not a positive multiple of "
                                         r"world_size x data.micro_batch_size = 4"):
        build_loader(cfg_for(manifest, micro_batch_size=2, num_workers=0), 0, 2, global_batch_size=6)
    with pytest.raises(ValueError, match=r"data.block_size: must be >= 1 samples"):
        build_loader(cfg_for(manifest, block_size=0), 0, 1)


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
    fork = cfg_for(manifest, micro_batch_size=2, num_workers=2)
    spawn = cfg_for(manifest, micro_batch_size=2, num_workers=2, mp_context="spawn")
    assert run_epoch(build_loader(spawn, 0, 1, transform=ids_of, global_batch_size=6)) == \
        run_epoch(build_loader(fork, 0, 1, transform=ids_of, global_batch_size=6))
