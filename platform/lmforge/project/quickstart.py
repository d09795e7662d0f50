"""The built-in pipeline, then the trained model served and asked (`lmforge quickstart`).

The pipeline (resources/pipelines/quickstart.yaml) runs every stage lmforge has on the
built-in corpus with a tiny model, on an embedded local Ray. Then the newest model artifact
is deployed on Ray Serve exactly as `lmforge serve` deploys it, one completion and one chat
request go through the official `openai` client, and the answers are printed with the
commands to serve and query the model yourself.
"""

from __future__ import annotations

from importlib import resources

from lmforge.stage import StageResult

MODEL_NAME = "quickstart"

# The held-out (val split) bits-per-byte of the previous quickstart recipe (the `tiny` preset,
# 40 steps x 4096 tokens at lr 3e-3 on 2 FSDP workers), measured on the same data stage on a
# 2-core machine, 2026-12-01: `lmforge pipeline run` of quickstart.yaml's data and train stages
# with model.preset=tiny, train.max_steps=40, resources.num_workers=2 (docs/training.md#cpu-preset).
BASELINE_VAL_BPB = 2.736


def quickstart_pipeline() -> str:
    return str(resources.files("lmforge") / "resources" / "pipelines" / "quickstart.yaml")


def newest_artifact(results: list[StageResult]) -> str | None:
    """The model of the last stage that made one (fine-tuning after pretraining, when present)."""
    from lmforge import storage
    from lmforge.model.artifact import is_artifact

    for result in reversed(results):
        candidate = storage.join(result.output, "model")
        if is_artifact(candidate):
            return candidate
    return None


def print_curves(results: list[StageResult]) -> list[str]:
    """One line per training or fine-tuning run: where its loss curve is."""
    from lmforge import storage
    from lmforge.plots import LOSS_PNG

    curves = []
    for r in results:
        path = storage.join(r.output, LOSS_PNG)
        if r.stage in ("train", "finetune") and storage.exists(path):
            print(f"  {r.stage + ' loss':<15} {path}")
            curves.append(path)
    return curves


def final_val_bpb(train_output: str) -> float | None:
    """The last held-out bits-per-byte a training run logged (metrics.jsonl), if any."""
    from lmforge.plots import read_metrics

    scores = [row["val_bpb"] for row in read_metrics(train_output) if "val_bpb" in row]
    return float(scores[-1]) if scores else None


def print_pretraining(results: list[StageResult]) -> float | None:
    """The pretraining run's final val bpb, beside the previous recipe's (BASELINE_VAL_BPB)."""
    for r in results:
        bpb = final_val_bpb(r.output) if r.stage == "train" else None
        if bpb is not None:
            change = 100 * (bpb - BASELINE_VAL_BPB) / BASELINE_VAL_BPB
            print(
                f"\npretraining: val bpb {bpb:.3f} (before: {BASELINE_VAL_BPB:.3f} with the "
                f"previous recipe), {change:+.1f}%"
            )
            return bpb
    return None


def print_before_after(finetune_output: str) -> dict[str, tuple[float, float]]:
    """The fine-tuning run's held-out scores before its first step and after its last."""
    from lmforge.finetune.stage import before_after

    changes = before_after(finetune_output)
    if not changes:
        return {}
    print("\nfine-tuning on held-out questions (before the first step -> after the last):")
    for key, (before, after) in changes.items():
        name = "answer loss (nats/token)" if key == "val_loss" else key.removeprefix("eval/")
        print(f"  {name:<32} {before:8.4f} -> {after:8.4f}")
    return changes


def serve_and_ask(
    artifact: str, port: int, keep_serving: bool, address: str | None = None
) -> dict[str, str]:
    """Deploy `artifact` on Ray Serve (the Ray at `address`, else RAY_ADDRESS, else an embedded
    one), send one completion and one chat request, print both."""
    from openai import OpenAI
    from ray import serve

    from lmforge.cluster.local import connect, port_or_free
    from lmforge.console import quiet_loggers
    from lmforge.serve.app import application
    from lmforge.serve.config import ServeArgs

    connect(address)
    quiet_loggers("ray.serve")  # "Started Serve ...", as `lmforge serve` does (-v shows them)
    port = port_or_free(port)
    args = ServeArgs.model_validate(
        {"models": [{"name": MODEL_NAME, "artifact": artifact}], "port": port}
    )
    base = f"http://127.0.0.1:{port}"
    print(f"\n=== serving {artifact} as '{MODEL_NAME}' at {base}/v1 ===", flush=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(application(args), name="lmforge-quickstart", route_prefix="/", blocking=False)
        client = OpenAI(
            base_url=f"{base}/v1", api_key="not-needed-locally", max_retries=2, timeout=120
        )
        prompt = "The os module provides"
        completion = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0
        )
        question = "What does os.getcwd do?"
        chat = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": question}],
            max_tokens=24,
            temperature=0,
        )
        answers = {
            "completion": completion.choices[0].text,
            "chat": chat.choices[0].message.content or "",
        }
        print(f"completion  {prompt!r} -> {answers['completion']!r}")
        print(f"chat        {question!r} -> {answers['chat']!r}")
        print(
            "(a tiny model trained for a few minutes on a CPU: its answers are not meant to be good)"
        )
        print(
            "\nserve it yourself:\n"
            f"  lmforge serve --model {artifact} --name {MODEL_NAME}\n"
            f"  curl {base}/v1/completions -H 'Content-Type: application/json' \\\n"
            f'    -d \'{{"model": "{MODEL_NAME}", "prompt": "{prompt}", "max_tokens": 24}}\''
        )
        if keep_serving:
            print(f"\nserving at {base}/v1 until Ctrl-C", flush=True)
            import time

            while True:
                time.sleep(3600)
        return answers
    finally:
        serve.shutdown()  # its "(raylet) ... graceful_shutdown failed" line: console.py drops it
