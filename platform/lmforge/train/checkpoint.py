"""Sharded checkpoints with torch.distributed.checkpoint (DCP), resume, and the final artifact.

Layout, under `<run>/checkpoints/` (Ray Train's run directory when run by Ray):

    step_00000050/  __0_0.distcp, __1_0.distcp, .metadata   model + optimizer shards (DCP)
                    train_state.json                           step, rows consumed, world size
                    rng_<rank>.pt                              each worker's RNG state (tensors)
                    _COMPLETE                                  written last, after every worker's files

Saving: every worker copies its shards to host memory (pinned on GPU) and writes them into a
local temp dir in a background thread (`dcp.async_save`) while training goes on; when the write
is done (after the next step), `ray.train.report(checkpoint=...)`
uploads and merges them into one checkpoint directory (without Ray: copied there directly);
after a barrier, rank 0 writes `_COMPLETE`. A checkpoint without the marker (a crash mid-save)
is never loaded: resume takes the newest complete one. DCP stores each tensor with its global
shape, so a checkpoint saved by W workers loads into W' workers (or into one plain process).

Loading never runs code from the checkpoint: a checkpoint directory may come from shared storage
that others can write, and unpickling runs whatever a pickle names. DCP's metadata is read with
an unpickler that knows only its own record types, its other entries (optimizer hyperparameters)
and the RNG states with `weights_only=True`; anything else is refused with `UnsafeCheckpoint`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from lmforge import storage

MARKER = "_COMPLETE"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    found = []
    for marker in storage.list_files(root, suffix=MARKER):
        parent = marker[: -len(MARKER) - 1]
        match = STEP_DIR.match(parent.rstrip("/").rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1])
        if match:
            found.append((int(match.group(1)), parent))
    return sorted(found)


def latest_checkpoint(root: str) -> tuple[int, str] | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


@dataclass
class _PendingSave:
    step: int
    name: str
    local: str  # this worker's files, written in the background
    metrics: dict[str, Any]
    writing: Future  # dcp.async_save's: done when the shards are on disk


@dataclass
class Checkpointer:
    root: str  # <run>/checkpoints
    keep_last: int
    rank: int
    world_size: int
    in_ray: bool
    trainable_only: bool = False  # LoRA: only the adapters (and their optimizer state) are saved
    _pending: _PendingSave | None = field(default=None, init=False, repr=False)
    _stager: Any = field(default=None, init=False, repr=False)
    _group: Any = field(default=None, init=False, repr=False)

    @property
    def options(self) -> StateDictOptions:
        return StateDictOptions(
            ignore_frozen_params=self.trainable_only, strict=not self.trainable_only
        )

    def _state(self, model, optimizer) -> tuple[dict, dict]:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        if self.trainable_only:  # a tied head is not seen as frozen by get_state_dict: drop it too
            model_sd = {k: v for k, v in model_sd.items() if ".lora_" in k}
        return model_sd, optim_sd

    def save(self, step: int, rows: int, model, optimizer, metrics: dict[str, Any]) -> str:
        """Start saving a sharded checkpoint of step `step` (every worker calls this); its path.

        The state is copied to host memory (pinned on GPU) before this returns, so training may
        go on and change the weights; the files are written in a background thread while it
        does. `wait` (the loop calls it after the next step) finishes the checkpoint:
        upload, barrier, `_COMPLETE`. Only one save is in flight at a time.
        """
        self.wait()
        name = step_dir_name(step)
        model_sd, optim_sd = self._state(model, optimizer)
        local = tempfile.mkdtemp(prefix=f"lmforge-ckpt-{name}-r{self.rank}-")
        torch.save(_rng_state(), os.path.join(local, f"rng_{self.rank}.pt"))
        if self.rank == 0:
            state = {"step": step, "rows": rows, "world_size": self.world_size}
            with open(os.path.join(local, "train_state.json"), "w") as f:
                json.dump(state, f)
        with _single_process_ok():
            writing = dcp.async_save(
                {"model": model_sd, "optim": optim_sd},
                checkpoint_id=local,
                async_stager=self._host_stager(),
                process_group=self._cpu_group(),
                no_dist=not dist.is_initialized(),  # one process: nothing to coordinate
            )
        self._pending = _PendingSave(step, name, local, metrics, writing)
        return storage.join(self.root, name)

    def wait(self) -> str | None:
        """Finish the save in flight, if any (every worker calls this); its path."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            with _single_process_ok():
                pending.writing.result()
            if self.in_ray:
                import ray.train

                ray.train.report(
                    pending.metrics or {"step": pending.step},
                    checkpoint=ray.train.Checkpoint.from_directory(pending.local),
                    checkpoint_dir_name=pending.name,
                )
            else:
                _upload(pending.local, storage.join(self.root, pending.name))
        finally:
            shutil.rmtree(pending.local, ignore_errors=True)
        _barrier()  # every worker's files are in place before the marker says so
        path = storage.join(self.root, pending.name)
        if self.rank == 0:
            storage.write_text(storage.join(path, MARKER), f"step {pending.step}\n")
            if not self.in_ray:  # Ray Train prunes its own (CheckpointConfig.num_to_keep)
                for _, old in complete_checkpoints(self.root)[: -self.keep_last]:
                    storage.remove(old)
        return path

    def close(self) -> str | None:
        """Finish the last save and free the host staging memory; its path."""
        try:
            return self.wait()
        finally:
            stager, self._stager = self._stager, None
            if stager is not None:
                stager.close()

    def _host_stager(self):
        # Reused across saves: its host buffers are allocated once. Pinned memory (fast,
        # non-blocking device-to-host copies) only exists with CUDA.
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            # (pinned, shared memory, async staging, non-blocking copy): staged before save
            # returns, so the next step may change the weights.
            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(cuda, False, False, cuda))
        return self._stager

    def _cpu_group(self):
        # The background write coordinates ranks over a gloo group of its own: its collectives
        # run in a side thread, and on the default group they would interleave with training's
        # (differently on each rank); Ray Train's default group on GPUs is NCCL only, anyway.
        if dist.is_initialized() and self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def restore(self, model, optimizer) -> dict[str, Any] | None:
        """Load the newest complete checkpoint into model and optimizer; its train state, or None."""
        found = _broadcast(latest_checkpoint(self.root) if self.rank == 0 else None)
        if found is None:
            return None
        step, path = found
        with _readable(path, self.rank) as (local, remote):
            model_sd, optim_sd = self._state(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            with _single_process_ok(), _refusing_pickles(path):
                # Read here first: inside dcp.load a refusal would only reach us as text.
                _SafeReader(local).read_metadata()
                reader = _SafeReader(local, remote=remote)
                dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner())
            set_state_dict(
                model,
                optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
                options=self.options,
            )
            with open(os.path.join(local, "train_state.json")) as f:
                train_state = json.load(f)
            rng = os.path.join(local, f"rng_{self.rank}.pt")
            if train_state["world_size"] == self.world_size and os.path.exists(rng):
                with _refusing_pickles(path):
                    _set_rng_state(torch.load(rng, weights_only=True))
        train_state["path"] = path
        return train_state


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds a pickled object other than tensors and plain values."""


# What DCP's .metadata pickle names: its own record types, torch.Size and dtypes, a path.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in _METADATA_MODULES or (module, name) in _METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the metadata names {module}.{name}")


class _SafeReader(dcp.FileSystemReader):
    """DCP's reader, whose metadata unpickler resolves only DCP's own record types.

    With `remote` (the checkpoint on an object store; `path` then holds only its small files),
    it first fetches the byte ranges this rank's load plan reads, into sparse local files at
    the same offsets: each worker downloads its share of the shards, not the checkpoint.
    """

    def __init__(self, path: str, remote: str | None = None) -> None:
        super().__init__(path)
        self.remote = remote

    def read_data(self, plan, planner):
        if self.remote is not None:
            self.fetched = _fetch_ranges(self.remote, str(self.path), self.storage_data, plan)
        return super().read_data(plan, planner)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"the metadata is a {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, loading its non-tensor entries (optimizer hyperparameters: numbers,
    tuples, names) with weights_only=True instead of a full unpickle."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes does with its value
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


@contextlib.contextmanager
def _refusing_pickles(path: str) -> Iterator[None]:
    try:
        yield
    except (pickle.UnpicklingError, CheckpointException) as e:
        # DCP wraps a worker's error in CheckpointException, keyed by rank.
        failures = (
            [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        )
        unpickling = [f for f in failures if isinstance(f, pickle.UnpicklingError)]
        if not unpickling:
            raise
        raise UnsafeCheckpoint(
            f"checkpoint {path}: refusing to load it: it holds a pickled object other than "
            f"tensors and plain values ({str(e).splitlines()[0]}); a checkpoint lmforge wrote "
            "never does. Remove it to resume from the one before, or start afresh"
        ) from None


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU; a collective (every worker calls it), rank 0 gets it all."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def artifact_state(directory: str) -> dict[str, torch.Tensor]:
    """A model artifact's weights as a full state dict (a tied head filled in), on CPU."""
    from safetensors.torch import load

    from lmforge.model.artifact import WEIGHTS, load_model_config

    tensors = load(storage.read_bytes(storage.join(directory, WEIGHTS)))
    if load_model_config(directory).tie_embeddings:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    return tensors


def load_full_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) weights into a possibly FSDP-sharded model; a collective.

    Rank 0 passes the weights (e.g. a base artifact's), the other ranks `{}`: rank 0 first
    gathers the model's current full state, so parameters the weights lack (new LoRA adapters)
    keep their initial values, then broadcasts everything and each rank keeps its shards. Keys
    the model lacks, or missing base weights, are an error: the artifact is the wrong model.
    """
    current = full_model_state(model)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if not distributed or dist.get_rank() == 0:
        unexpected = sorted(set(state) - set(current))
        missing = sorted(k for k in current if k not in state and ".lora_" not in k)
        if unexpected or missing:
            raise ValueError(
                f"base weights do not match the model (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})"
            )
        current.update({k: v.to(current[k].dtype) for k, v in state.items()})
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    set_model_state_dict(
        model, current if not distributed or dist.get_rank() == 0 else {}, options=options
    )


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def _local_dir(prefix: str) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _readable(path: str, rank: int) -> Iterator[tuple[str, str | None]]:
    """(a local directory holding the checkpoint at `path`, the URI its shards are fetched
    from or None). From a URI only the metadata, train state and this rank's RNG state are
    downloaded here; `_SafeReader` fetches the shard bytes this rank reads."""
    if storage.is_local(path):
        yield storage.local_path(path), None
        return
    with _local_dir("lmforge-restore-") as local:
        for name in (".metadata", "train_state.json", f"rng_{rank}.pt"):
            if storage.exists(storage.join(path, name)):
                with open(os.path.join(local, name), "wb") as f:
                    f.write(storage.read_bytes(storage.join(path, name)))
        yield local, path


def _fetch_ranges(remote: str, local: str, storage_data: dict, plan) -> int:
    """Copy the byte ranges `plan` reads from the checkpoint at `remote` into `local`, each at
    its own offset (the other bytes of a file stay a hole); the number of bytes fetched."""
    wanted: dict[str, set[tuple[int, int]]] = {}
    for item in plan.items:
        info = storage_data[item.storage_index]
        wanted.setdefault(info.relative_path, set()).add((info.offset, info.length))
    fetched = 0
    for name, ranges in sorted(wanted.items()):
        fs, inner = storage.resolve(storage.join(remote, name))
        target = os.path.join(local, name)
        with (
            fs.open_input_file(inner) as src,
            open(target, "r+b" if os.path.exists(target) else "wb") as dst,
        ):
            for offset, length in sorted(ranges):
                dst.seek(offset)
                dst.write(src.read_at(length, offset))
                fetched += length
    return fetched


def _upload(local: str, dest: str) -> None:
    fs, inner = storage.resolve(dest)
    fs.create_dir(inner, recursive=True)
    pafs.copy_files(local, inner, destination_filesystem=fs)


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns when it runs without a process group; for a 1-process run (in process, or
    run_local) that is the intent. The filter stays: `async_save` warns from its own thread,
    after a `catch_warnings` block here would have ended."""
    if not dist.is_initialized():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
    yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
