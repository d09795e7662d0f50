"""The end of a training run: the model artifact `<run>/model/`, its lineage, the loss curve."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from typing import Any

from lmforge import storage
from lmforge.model.artifact import read_version, save_artifact
from lmforge.plots import write_loss_curve
from lmforge.train.checkpoint import full_model_state
from lmforge.train.run import Run, WorkerEnv


def export_model(model, run: Run, env: WorkerEnv, last: dict[str, Any], full_state=None) -> None:
    """Consolidated weights (gathered to rank 0: every rank calls this), config, tokenizer.

    LoRA adapters are merged into their weights, so the artifact is a plain model.
    `full_state(model)` gathers the weights where `full_model_state` cannot (pipeline stages).
    """
    state = (full_state or full_model_state)(model)
    if env.rank != 0:
        return
    write_curves(run.spec.output, env, final=True)  # drawn while the weights are written
    if run.lora:
        from lmforge.model.lora import merge_lora_state

        state = merge_lora_state(state, run.lora.alpha / run.lora.rank)
    spec = run.spec
    save_artifact(
        storage.join(spec.output, "model"),
        state,
        run.arch,
        run.tokenizer_json,
        spec.config_yaml,
        lineage=lineage(run, last),
    )
    wait_for_curves()  # the run's outputs are complete when its stage returns


# Rank 0's drawing of loss.png at a checkpoint, in progress (one process trains one run).
_drawing: threading.Thread | None = None


def write_curves(output: str, env: WorkerEnv, final: bool = False) -> None:
    """`<run>/loss.png` from metrics.jsonl, by rank 0, at each checkpoint and at the end.

    Parsing and drawing take from a few tenths of a second to seconds for a long run
    (bench/loss_curve.py): rank 0 draws in a background thread, so the other ranks do not
    wait for it at the next collective (a checkpoint whose predecessor is still drawing skips
    its own: the next one catches up) and the end's figure is drawn while the artifact is
    written (`export_model` waits for it). The `final` figure waits for the one in progress,
    so it holds every step. A figure that cannot be drawn is a warning, not a failed run: the
    weights matter more.
    """
    global _drawing
    if env.rank != 0:
        return
    if _drawing is not None and _drawing.is_alive():
        if not final:
            return
        _drawing.join()
    _drawing = threading.Thread(target=_draw_loss_curve, args=(output,), daemon=True)
    _drawing.start()


def warm_curves(env: WorkerEnv) -> None:
    """Rank 0 imports matplotlib in the background while training runs, so the end's loss.png
    is only drawn, not imported and drawn, between the last step and the artifact."""
    if env.rank == 0:
        threading.Thread(target=_import_matplotlib, args=(), daemon=True).start()


def _import_matplotlib() -> None:
    with contextlib.suppress(Exception):  # the drawing reports its own failure
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401


def wait_for_curves() -> None:
    if _drawing is not None:
        _drawing.join()


def _draw_loss_curve(output: str) -> None:
    try:
        write_loss_curve(output)
    except Exception as e:  # any plotting error: reported in one line, the run goes on
        print(
            f"[train] warning: {output}/loss.png not written: {type(e).__name__}: {e}", flush=True
        )


def lineage(run: Run, last: dict[str, Any]) -> dict[str, Any]:
    """Where the artifact comes from (model/artifact.py): parent, data, config, run, val score."""
    spec = run.spec
    manifest = storage.read_bytes(storage.join(spec.data_dir, "manifest.json"))
    return {
        "parent": read_version(spec.base)["version"] if spec.base else None,
        "parent_path": spec.base,
        "data_manifest_hash": hashlib.sha256(manifest).hexdigest()[:12],
        "config_hash": spec.config_hash,
        "stage": spec.stage,
        "run": spec.output.rstrip("/").rsplit("/", 1)[-1],
        "val_bpb": last.get("val_bpb"),
        "val_loss": last.get("val_loss"),
    }
