"""MFU against a CPU peak probed once per node and shared; `precision: auto`."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.train import hardware, mfu
from lmforge.train.config import LoopConfig
from lmforge.train.hardware import Hardware, choose_precision, decide, for_worker
from lmforge.train.loop import run_local
from tests.train.test_loop import local_config


def test_an_mfu_over_one_fails_loudly_and_is_never_reported(monkeypatch):
    assert mfu.mfu(1000.0, 1e9, 2.0) == pytest.approx(0.5)
    with pytest.raises(mfu.MfuAboveOne, match="over 100%"):
        mfu.mfu(1000.0, 1e9, 0.5)  # the test suite runs with LMFORGE_STRICT_MFU=1
    monkeypatch.delenv("LMFORGE_STRICT_MFU")
    with pytest.warns(UserWarning, match="peak 0.5 TFLOP/s is too low"):
        assert mfu.mfu(1000.0, 1e9, 0.5) is None


def test_the_cpu_peak_is_probed_once_per_cpu_model_dtype_and_threads(monkeypatch, tmp_path):
    probes = []

    def probe(dtype):
        probes.append((dtype, torch.get_num_threads()))
        return 0.25

    monkeypatch.setattr(mfu, "cpu_matmul_tflops", probe)
    cache = tmp_path / "cpu_peak.json"
    first = mfu.cpu_peak(torch.float32, 1, cache)
    again = mfu.cpu_peak(torch.float32, 1, cache)  # another rank on this node: no probe
    mfu.cpu_peak(torch.bfloat16, 1, cache)
    mfu.cpu_peak(torch.float32, 2, cache)
    assert probes == [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 2)]
    assert first[0] == again[0] == 0.25
    assert "cached" not in first[1] and "cached" in again[1]
    keys = list(json.loads(cache.read_text()))
    assert len(keys) == 3 and all(k.startswith(mfu.cpu_model()) for k in keys)


def test_a_real_probe_grows_the_matrix_until_the_rate_stops_rising():
    small = mfu.best_matmul_rate(torch.randn(32, 32), torch.randn(32, 32), 0.05)
    probed = mfu.cpu_matmul_tflops(torch.float32, seconds=0.1)
    assert probed > small > 0  # a 32 x 32 matmul is far from the kernel's peak


@pytest.mark.parametrize(
    "precision,device,bf16_over_fp32,want",
    [
        ("auto", "cpu", 0.6, False),  # AVX-512 BF16 without AMX, or no native bf16 at all
        ("auto", "cpu", 3.0, True),  # AMX
        ("auto", "cuda", None, True),
        ("bf16", "cpu", 0.6, True),  # as configured, even when slower
        ("fp32", "cpu", 3.0, False),
    ],
)
def test_precision_auto_picks_bf16_only_where_it_is_faster(
    monkeypatch, precision, device, bf16_over_fp32, want
):
    peaks = {torch.float32: 1.0, torch.bfloat16: bf16_over_fp32}
    monkeypatch.setattr(hardware, "cpu_peak", lambda dtype, threads: (peaks[dtype], "probe"))
    bf16, why = choose_precision(precision, device, 2)
    assert bf16 is want
    if precision == "auto" and device == "cpu":
        assert f"{bf16_over_fp32:.2f}x fp32" in why


def test_auto_is_the_default_precision():
    assert LoopConfig().precision == "auto"


def test_workers_take_the_drivers_decision_and_probe_only_on_another_cpu(monkeypatch):
    cfg = LoopConfig()
    monkeypatch.setattr(hardware, "cpu_peak", lambda dtype, threads: (0.02, "worker probe"))
    here = hardware._where(torch.device("cpu"), torch.get_num_threads())
    same = Hardware(False, "auto: ...", 0.3, "driver probe", here)
    assert for_worker(same.as_dict(), cfg, torch.device("cpu")).peak_tflops == 0.3
    other = Hardware(True, "auto: ...", 0.3, "driver probe", "Another CPU, 2 threads")
    got = for_worker(other.as_dict(), cfg, torch.device("cpu"))
    assert (got.bf16, got.peak_tflops, got.peak_source) == (True, 0.02, "worker probe")


@pytest.mark.slow
def test_a_cpu_run_reports_mfu_against_the_shared_peak(packed_data, tmp_path, capsys):
    cfg = local_config(packed_data, tmp_path, train={"precision": "auto", "peak_tflops": None})
    hw = decide(cfg.train, torch.device("cpu"))  # what the driver does before workers start
    summary = run_local(cfg, str(tmp_path / "run"))
    assert summary["peak_tflops_per_device"] == hw.peak_tflops
    assert "cached" in summary["peak_source"]  # the run probed nothing itself
    want = summary["tokens_per_s"] * summary["flops_per_token"] / (hw.peak_tflops * 1e12)
    assert summary["mfu"] == pytest.approx(want) and 0 < summary["mfu"] <= 1
    log = capsys.readouterr().out
    assert f"precision {'bf16' if hw.bf16 else 'fp32'} (auto: bf16 matmuls run" in log
