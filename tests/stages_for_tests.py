"""Small stages for pipeline tests: no Ray, real files, so skipping and chaining are observable."""

from pydantic import Field

from lmforge import StageFailed, storage
from lmforge.stage import Stage, StageConfig

RUNS: list[str] = []  # names of stages that actually ran, in order


class WriteConfig(StageConfig):
    value: int = Field(1, description="number to write")


def write_run(cfg, ctx):
    RUNS.append("write")
    storage.write_text(storage.join(ctx.output, "value.txt"), str(cfg.value))
    return {"value": cfg.value}


class DoubleConfig(StageConfig):
    source: str = Field("", description="output dir of a write stage")
    fail: bool = Field(False, description="raise instead of writing")


def double_run(cfg, ctx):
    RUNS.append("double")
    if cfg.fail:
        raise StageFailed("asked to fail")
    value = int(storage.read_text(storage.join(cfg.source, "value.txt")))
    storage.write_text(storage.join(ctx.output, "value.txt"), str(2 * value))
    return {"value": 2 * value}


WRITE = Stage("write", WriteConfig, write_run, "writes a number", uses_ray=False)
DOUBLE = Stage(
    "double",
    DoubleConfig,
    double_run,
    "doubles the number of its input",
    input_field="source",
    uses_ray=False,
)
