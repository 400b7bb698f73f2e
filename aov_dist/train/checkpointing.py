"""Writing and reading a training job's checkpoints (the layout and the commit rule are in
checkpoint.py).

Saving: every rank writes its part of ``<storage>/<run>/step_<N>/``; rank 0 writes ``COMMITTED``
last, once every rank's part is complete, then prunes. On local (or shared) storage the write is
the save and the commit follows at once. On remote storage (``s3://``) each rank writes to a local
staging folder (DeepSpeed's partitions; rank 0 also the consolidated HF export, the trainer state
and the config) and a background thread uploads it while training goes on. Each step's one
all-reduce carries every rank's "uploaded" and "failed" flags (``status``), so all ranks learn at
the same step that the checkpoint is complete (then it is committed and reported) or that an
upload failed (then every rank raises, naming the target: no rank waits in a collective the others
left). At most one checkpoint is in flight: the next save, and the end of the job, first wait for
it (``finish``). A crash before the commit leaves the previous checkpoint the newest committed one.

Resuming on the world size that wrote the checkpoint: each rank downloads only the DeepSpeed files
it loads (its own partitions) from remote storage, into a temporary folder removed after the load,
and restores its own loader position and RNG. On another world size (fewer or more workers): the
first worker of each machine converts the ZeRO files to DeepSpeed's universal form in a node-local
folder (downloading the whole ``ds/`` folder once per machine when it is remote), every rank loads
its new partitions from there, continues the one global sample order from rank 0's loader state
(rank 0 takes over the job's skip counts) and reseeds its RNG from (train.seed, step, rank).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from omegaconf import OmegaConf

from aov_dist import storage
from aov_dist.train import checkpoint as ckpt

log = logging.getLogger(__name__)
OnCommit = Callable[[int, str, dict], None]  # (step, step folder, the saving step's metrics)


@dataclass
class _InFlight:
    step: int
    final: str
    metrics: dict
    staging: str
    thread: threading.Thread
    error: list = field(default_factory=list)  # the upload thread's exception, if any


class CheckpointWriter:
    """One rank's side of saving a job's checkpoints (see the module docstring)."""

    def __init__(self, cfg, strategy, processor, rank: int, world: int, on_commit: OnCommit,
                 keep_steps: Callable[[], set[int]] = set):
        self.cfg, self.strategy, self.processor = cfg, strategy, processor
        self.rank, self.world, self.on_commit = rank, world, on_commit
        self.keep_steps = keep_steps  # steps pruning must keep besides the newest (asked on rank 0)
        # stage 1 trains the expert inside a model that stays as loaded: its hf/ holds only the
        # trained weights and names the base (model/partial.py)
        self.base = _base_of(cfg) if cfg.stage.name == "stage1" else None
        self.in_flight: Optional[_InFlight] = None

    # ------------------------------------------------------------------------------ save
    def save(self, step: int, losses: list[float], loader, skips, metrics: dict) -> None:
        if self.in_flight is not None:
            self.finish()  # one checkpoint in flight at most
        final = ckpt.step_dir(self.cfg.train.storage_path, self.cfg.train.run_name, step)
        remote = storage.is_remote(final)
        local = tempfile.mkdtemp(prefix="aov-ckpt-") if remote else final
        os.makedirs(local, exist_ok=True)
        self.strategy.save(f"{local}/ds")
        ckpt.write_json(f"{local}/loader/rank_{self.rank}.json", loader.state_dict())
        ckpt.write_json(f"{local}/rng/rank_{self.rank}.json", ckpt.rng_state())
        hf_state = (self.strategy.consolidated_state_dict(trainable_only=self.base is not None)
                    if self.cfg.train.export_hf_in_checkpoints else None)
        trainer_state = {"step": step, "losses": list(losses), "epoch": loader.epoch, "world_size": self.world,
                         "skip_window": skips.state_dict() if skips else {}}
        if not remote:
            self._write_rank0_files(local, hf_state, trainer_state)
            self.strategy.barrier()  # every rank's part is on the storage: commit
            self._commit(step, final, metrics)
            return
        flight = _InFlight(step, final, metrics, local, thread=None)  # type: ignore[arg-type]

        def persist() -> None:
            try:
                self._write_rank0_files(local, hf_state, trainer_state)
                upload_part(local, final, self.rank)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread (settle/finish)
                flight.error.append(e)
            finally:
                shutil.rmtree(local, ignore_errors=True)

        flight.thread = threading.Thread(target=persist, name=f"aov-checkpoint-{step}", daemon=True)
        flight.thread.start()
        self.in_flight = flight

    def _write_rank0_files(self, local: str, hf_state, trainer_state: dict) -> None:
        if self.rank != 0:
            return
        if hf_state is not None:
            self.strategy.write_hf(f"{local}/{ckpt.HF_DIR}", hf_state, self.processor, self.base)
        ckpt.write_json(f"{local}/trainer_state.json", trainer_state)
        # the job's resolved config: aov-export rebuilds the model from it (no hf/ needed), resume
        # checks against it (redacted: a secret-looking key must not land in storage)
        storage.write_bytes(f"{local}/{ckpt.CONFIG_FILE}", safe_yaml(self.cfg).encode())

    # ---------------------------------------------------------------------------- commit
    def status(self) -> list[float]:
        """[uploaded, failed] for this rank's checkpoint in flight (0, 0 when there is none), summed
        over ranks by the step's all-reduce."""
        f = self.in_flight
        if f is None:
            return [0.0, 0.0]
        if f.error:
            return [0.0, 1.0]
        return [0.0 if f.thread.is_alive() else 1.0, 0.0]

    def settle(self, uploaded: int, failed: int) -> None:
        """After the step's all-reduce (the same sums on every rank): commit a checkpoint every rank
        has uploaded, or stop every rank on a failed upload."""
        if self.in_flight is None:
            return
        if failed:
            self._raise_failure(failed)
        if uploaded == self.world:
            self._commit_in_flight()

    def finish(self) -> None:
        """Wait for this rank's upload, agree with the others (one collective), commit (collective)."""
        if self.in_flight is None:
            return
        self.in_flight.thread.join()
        uploaded, failed = (int(v) for v in self.strategy.sum_over_ranks(self.status()))
        if failed:
            self._raise_failure(failed)
        self._commit_in_flight()

    def _raise_failure(self, failed: int) -> None:
        f, self.in_flight = self.in_flight, None
        f.thread.join()
        if f.error:
            raise f.error[0]
        raise RuntimeError(f"checkpoint {f.final}: the upload of {failed} other rank(s) failed; the step is not "
                           f"committed, the previous checkpoint stays the newest")

    def _commit_in_flight(self) -> None:
        f, self.in_flight = self.in_flight, None
        f.thread.join()
        self._commit(f.step, f.final, f.metrics)

    def _commit(self, step: int, final: str, metrics: dict) -> None:
        if self.rank == 0:
            ckpt.write_marker(final, step, self.world)
            ckpt.prune(self.cfg.train.storage_path, self.cfg.train.run_name, self.cfg.train.keep_checkpoints,
                       self.keep_steps())
        self.on_commit(step, final, metrics)


def _base_of(cfg) -> dict:
    """The ModelConfig fields the job's model was built from (tasks.model_config_for), with the
    runtime choices left to whoever loads it (dtype, attention, checkpointing)."""
    import dataclasses

    from aov_dist.train.tasks import model_config_for

    model = dataclasses.replace(model_config_for(cfg), dtype="auto", attn_implementation="auto",
                                activation_checkpointing=False)
    return dataclasses.asdict(model)


def upload_part(local: str, final: str, rank: int) -> None:
    """Each rank's part of a remote checkpoint. botocore retries every request (storage.py); a
    copy that still fails names the target: no marker is written, so the previous checkpoint stays
    the newest committed one."""
    try:
        storage.copy_from_local(local, final)
    except Exception as e:
        raise RuntimeError(f"checkpoint {final}: rank {rank} could not upload its part ({type(e).__name__}: {e}; "
                           f"each request was tried {storage.WRITE_ATTEMPTS} times); the step is not committed, "
                           f"the previous checkpoint stays the newest") from e


def safe_yaml(cfg) -> str:
    from aov_dist.tracking.redact import redact

    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.structured(cfg)))))


# ------------------------------------------------------------------------------------ restore
def restore(strategy, loader, skips, path: str, rank: int, result) -> None:
    """Load every rank's state of the committed step folder ``path`` into the running job (on
    another world size when the strategy was initialised with ``load_universal``)."""
    state = ckpt.read_json(f"{path}/trainer_state.json")
    if strategy.load_universal:
        _load_resharded(strategy, path)
        loader.load_state_dict(ckpt.read_json(f"{path}/loader/rank_0.json"))
        if rank == 0:  # the job's skip and filter counts so far, so the summed metrics go on from them
            loader.set_counts_before(*_job_counts(path, int(state["world_size"])))
        ckpt.reseed(strategy.cfg.train.seed, int(state["step"]), rank)
    else:
        local, fetched = _fetch_own_state(strategy, path, rank)
        try:
            strategy.load(f"{local}/ds")
        finally:
            if fetched is not None:
                shutil.rmtree(local, ignore_errors=True)
        result.restored_bytes = fetched or 0
        loader.load_state_dict(ckpt.read_json(f"{path}/loader/rank_{rank}.json"))
        ckpt.set_rng_state(ckpt.read_json(f"{path}/rng/rank_{rank}.json"))
    skips.load_state_dict(state.get("skip_window", {}))
    result.step, result.losses, result.resumed_from = state["step"], list(state["losses"]), path
    log.info("rank %d resumed from %s at step %d%s", rank, path, result.step,
             f" (written by {state['world_size']} workers: resharded)" if strategy.load_universal else "")


def _load_resharded(strategy, path: str) -> None:
    """Load a checkpoint of another world size through its universal form, made once per machine."""
    def convert(target) -> None:
        src = f"{path}/ds"
        if storage.is_remote(path):
            src = f"{target}/downloaded"
            storage.copy_to_local(f"{path}/ds", src)
        strategy.to_universal(src, f"{target}/ds")
        if src != f"{path}/ds":
            shutil.rmtree(src, ignore_errors=True)

    root = os.path.join(os.environ.get("AOV_CACHE", os.path.expanduser("~/.cache/aov_dist")), "resharded")
    target, built = storage.build_once(path.rstrip("/"), convert, root)
    try:
        strategy.load(f"{target}/ds")
    finally:
        strategy.barrier()  # every rank of every machine has loaded: the converted copy can go
        if built:
            shutil.rmtree(target, ignore_errors=True)


def _job_counts(path: str, saved_world: int) -> tuple[dict[str, int], dict[str, int]]:
    """Skipped and filtered samples of the job up to ``path``: the sum over the ranks that wrote it."""
    skipped: dict[str, int] = {}
    filtered: dict[str, int] = {}
    for r in range(saved_world):
        state = ckpt.read_json(f"{path}/loader/rank_{r}.json")
        for total, part in ((skipped, state.get("skipped", {})), (filtered, state.get("filtered", {}))):
            for k, v in part.items():
                total[k] = total.get(k, 0) + int(v)
    return skipped, filtered


def _fetch_own_state(strategy, path: str, rank: int) -> tuple[str, Optional[int]]:
    """DeepSpeed reads local files. From remote storage each rank downloads only the files it
    loads (its own ZeRO partitions: 1/world of the state), not the whole ds/ folder. Returns the
    local step folder and the bytes downloaded (None: the checkpoint was local already)."""
    if not storage.is_remote(path):
        return path, None
    tmp = tempfile.mkdtemp(prefix="aov-resume-")
    state = f"{path}/ds/{strategy.TAG}"
    fetched = 0
    try:
        for name in strategy.files_of_rank(storage.list_names(state), rank):
            fetched += storage.download(f"{state}/{name}", f"{tmp}/ds/{strategy.TAG}/{name}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, fetched


def run_hooks(*hooks: Optional[OnCommit]) -> OnCommit:
    """One commit callback calling the given ones in order (None skipped)."""
    def on_commit(step: int, path: str, metrics: dict) -> None:
        for hook in hooks:
            if hook is not None:
                hook(step, path, metrics)
    return on_commit

