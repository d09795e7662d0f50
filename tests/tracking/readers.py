"""Read what each backend wrote, independently of the code that wrote it: MLflow through its
client, W&B's offline `.wandb` file (a LevelDB-style log of protobuf records) and TensorBoard's
event files (TFRecords of `Event` protos)."""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any


def mlflow_run(uri: str, run_id: str) -> dict[str, Any]:
    """params, tags, status and metric histories ({key: [(step, value), ...]}) of a run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }
    return {
        "params": dict(run.data.params),
        "tags": dict(run.data.tags),
        "status": run.info.status,
        "metrics": {k: sorted(v) for k, v in history.items()},
        "artifacts": artifact_paths(client, run_id),
        "run": run,
    }


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


# W&B's transaction log: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB
# blocks of records, each with a 7-byte header (crc32c, length, type: full/first/middle/last).
WANDB_HEADER, BLOCK, FULL, FIRST, MIDDLE, LAST = 7, 32768, 1, 2, 3, 4


def wandb_records(path: str) -> list:
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    records, pending, offset = [], b"", WANDB_HEADER
    while offset + 7 <= len(data):
        left = BLOCK - offset % BLOCK
        if left < 7:  # the block's tail is padding
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if kind == 0 and length == 0:
            offset += left
            continue
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def wandb_run(directory: str, run_id: str) -> dict[str, Any]:
    """history ({key: [(step, value)]}), config, summary and saved files of an offline run:
    each attempt (a resume) leaves an `offline-run-<time>-<id>` folder; `wandb sync` merges them."""
    attempts = sorted(glob.glob(os.path.join(directory, "wandb", f"offline-run-*-{run_id}*")))
    assert attempts, f"no offline run {run_id} under {directory}"
    history: dict[str, list] = {}
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    files: set[str] = set()
    for run_dir in attempts:
        files |= {
            os.path.relpath(p, os.path.join(run_dir, "files"))
            for p in glob.glob(os.path.join(run_dir, "files", "**", "*"), recursive=True)
            if os.path.isfile(p)
        }
        records = [r for p in sorted(glob.glob(f"{run_dir}/*.wandb")) for r in wandb_records(p)]
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                step = items.pop("_step")
                for key, value in items.items():
                    if not key.startswith("_"):
                        history.setdefault(key, []).append((step, value))
            elif kind == "config":
                for item in record.config.update:
                    config[item.key] = json.loads(item.value_json)
            elif kind == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"history": history, "config": config, "summary": summary, "files": files}


def tensorboard_events(logdir: str) -> dict[str, Any]:
    """scalars ({tag: [(step, value)]}) and text summaries ({tag: [text]}) of a log dir."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list] = {}
    texts: dict[str, list] = {}
    paths = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    for path in sorted(paths, key=os.path.getmtime):
        with open(path, "rb") as f:
            data, offset = f.read(), 0
        while offset < len(data):  # TFRecord: u64 length, u32 crc, data, u32 crc
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("tensor") and value.metadata.plugin_data.plugin_name == "text":
                    tag = value.tag.removesuffix("/text_summary")
                    texts.setdefault(tag, []).append(value.tensor.string_val[0].decode())
                elif value.HasField("simple_value") or value.WhichOneof("value") == "simple_value":
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return {"scalars": scalars, "texts": texts}
