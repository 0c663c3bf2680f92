"""Smoke runs of ``benchmarks/throughput.py``, ``suite.py``, ``decode.py`` and ``lora_vs_trl.py`` with their smallest settings,
so the scripts cannot silently rot; plus the fairness premise they rest on: the HF peer is the same
function as the lmlab model (same logits from the same weights), trained on the same tokens.

Timings are never asserted (docs/design.md: performance is measured in benchmarks, not in tests); only
that every figure the lead's RESULTS.md needs is produced, finite and consistent.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import decode  # noqa: E402
import suite  # noqa: E402
import throughput  # noqa: E402

pytest.importorskip("transformers")

ENV_KEYS = ("device_name", "dtype", "threads", "torch", "command")


def test_hf_peer_is_the_same_model_on_the_same_tokens():
    """Same weights -> same logits (so tokens/s compare equal work), and the HF loop's loss on the
    benchmark batch equals lmlab's cross-entropy on the same T−1 targets."""
    cfg, seq_len = common.model_config("tiny")
    trainer, batches = common.build_lmlab(cfg, seq_len, 2, "fp32", torch.device("cpu"))
    hf = common.hf_llama(cfg, trainer.model).eval()
    trainer.model.eval()
    ids = batches.next_batch(2)["input_ids"]
    with torch.no_grad():
        ours = trainer.model(ids)
        theirs = hf(input_ids=ids).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
        hf_loss = float(hf(input_ids=ids, labels=ids).loss)
    ref = torch.nn.functional.cross_entropy(ours[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    assert hf_loss == pytest.approx(float(ref), rel=1e-5)
    # ln(256) ≈ 5.545: a freshly initialised model is near the uniform distribution
    assert abs(hf_loss - math.log(cfg.vocab_size)) < 0.1


def test_synthetic_batches_are_shifted_windows_and_resumable():
    batches = common.SyntheticBatches(vocab_size=50, seq_len=8, batch_size=3, n_batches=2, seed=1)
    first = batches.next_batch(3)
    assert first["input_ids"].shape == first["labels"].shape == (3, 8)
    assert torch.equal(first["input_ids"][:, 1:], first["labels"][:, :-1])
    state = batches.state_dict()
    second = batches.next_batch(3)
    batches.load_state_dict(state)
    assert torch.equal(batches.next_batch(3)["input_ids"], second["input_ids"])
    with pytest.raises(ValueError, match="batches of 3"):
        batches.next_batch(4)


def test_interleaved_alternates_and_reports_failures_per_runner():
    calls: list[str] = []

    def ok() -> float:
        calls.append("a")
        return 1.0

    def boom() -> float:
        calls.append("b")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    cpu = torch.device("cpu")
    runners = [common.Runner("a", ok, 10, cpu), common.Runner("b", boom, 10, cpu)]
    rates = common.interleaved(runners, warmup=1, steps=2, reps=3)
    assert calls == ["a", "b"] + ["a", "a"] * 3  # warmup a, warmup b (fails), then only a
    assert len(rates["a"]) == 3 and rates["b"] == []
    assert runners[1].error.startswith("OutOfMemoryError: CUDA out of memory")
    assert runners[0].error is None


def test_matmul_peak_and_gpu_peak_table():
    flops, size = common.measure_matmul_peak(torch.device("cpu"), "fp32", 0.01, 32)
    assert math.isfinite(flops) and flops > 0 and size == 32
    flops, size = common.measure_matmul_peak(torch.device("cpu"), "fp32", 0.01)  # adaptive: stays small
    assert size == 512 and flops > 0
    assert common.nominal_bf16_peak(torch.device("cpu")) is None
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA A100-SXM4-80GB": 312e12}
    for name, peak in names.items():
        found = next(p for words, p in common.GPU_BF16_PEAKS if all(w in name for w in words))
        assert found == peak


def test_throughput_script_smoke(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    argv = ["--sizes", "tiny", "--dtypes", "fp32", "--threads", "1", "--batch", "2", "--steps", "1"]
    argv += ["--reps", "2", "--warmup", "1", "--peak-size", "32", "--peak-seconds", "0.01", "--json", str(out)]
    assert throughput.main(argv) == 0
    table = capsys.readouterr().out
    assert "| size | dtype | threads | lmlab tok/s | HF tok/s | lmlab / HF |" in table
    (row,) = json.loads(out.read_text())["rows"]
    assert all(row[key] not in (None, "") for key in ENV_KEYS)
    assert row["size"] == "tiny" and row["dtype"] == "fp32" and row["threads"] == 1
    for impl in ("lmlab", "hf"):
        assert row[impl]["error"] is None
        assert len(row[impl]["tokens_per_s_reps"]) == 2
        assert row[impl]["tokens_per_s"] > 0
        expected = row[impl]["tokens_per_s"] * row["training_flops_per_token"] / row["matmul_peak_flops"]
        assert row[impl]["fraction_of_matmul_peak"] == pytest.approx(expected)
    assert row["ratio_lmlab_over_hf"] == pytest.approx(row["lmlab"]["tokens_per_s"] / row["hf"]["tokens_per_s"])
    assert throughput.main(["--sizes", "huge"]) == 2


def test_decode_script_smoke(tmp_path, capsys):
    """Every CPU implementation runs, lmlab and HF agree on the greedy tokens, and so do all the variants."""
    out = tmp_path / "decode.json"
    argv = ["--sizes", "tiny", "--batches", "1,2", "--prompt-len", "8", "--new-tokens", "4", "--threads", "1"]
    argv += ["--reps", "2", "--warmup", "1", "--check-tokens", "4", "--json", str(out)]
    assert decode.main(argv) == 0
    table = capsys.readouterr().out
    assert "| size | batch | lmlab dynamic decode tok/s | lmlab static decode tok/s | HF dynamic decode" in table
    rows = json.loads(out.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 2]
    for row in rows:
        assert all(row[key] not in (None, "") for key in ENV_KEYS)
        assert row["parity_fp32"]["lmlab_vs_hf"] is True and row["parity_fp32"]["static_vs_dynamic"] is True
        for impl in ("lmlab_dynamic", "lmlab_static", "hf_dynamic", "hf_static"):
            assert row[impl]["error"] is None and row[impl]["same_tokens_as_lmlab_dynamic"] is True
            assert len(row[impl]["tokens_per_s_reps"]) == len(row[impl]["prefill_call_tokens_per_s_reps"]) == 2
            assert row[impl]["tokens_per_s"] > 0 and row[impl]["prefill_seconds"] > 0
            prefill_rate = row["batch"] / row[impl]["prefill_seconds"]
            expected = decode.decode_rate(row["batch"], 4, row[impl]["tokens_per_s"], prefill_rate)
            assert row[impl]["decode_tokens_per_s"] == (None if expected is None else pytest.approx(expected))
        assert "lmlab_graphs" not in row  # CUDA only
        best = max(row["lmlab_dynamic"]["tokens_per_s"], row["lmlab_static"]["tokens_per_s"])
        ratio = best / row["hf_static"]["tokens_per_s"]
        assert row["best_lmlab_over_hf_static_tokens_per_s"] == pytest.approx(ratio)
    # 3 decode steps of 1 token: 2 × 3 / (2 × 4 / 8 − 2 / 4) = 12 tokens/s; a negative difference is no rate
    assert decode.decode_rate(2, 4, 8.0, 4.0) == pytest.approx(12.0)
    assert decode.decode_rate(2, 4, 16.0, 2.0) is None
    assert decode.main(["--impls", "lmlab_graphs"]) == 2  # needs --device cuda


def test_suite_quick_smoke(tmp_path, capsys):
    out, md = tmp_path / "suite.json", tmp_path / "suite.md"
    assert suite.main(["--quick", "--cpu-only", "--no-memory", "--json", str(out), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert md.read_text() in printed
    (row,) = result["cpu"]
    assert all(row[key] not in (None, "") for key in ENV_KEYS)
    for impl in suite.IMPLS:
        assert row[impl]["error"] is None and row[impl]["tokens_per_s"] > 0
        assert row[impl]["steps_per_s"] == pytest.approx(row[impl]["tokens_per_s"] / (2 * 32))
    assert row["ratio_lmlab_over_hf_trainer"] > 0
    scaling = result["cpu_scaling"]
    assert scaling["errors"] == [] and scaling["wrapper_n"] == "DistributedDataParallel"
    assert scaling["efficiency"] == pytest.approx(scaling["tokens_per_s_n"] / (2 * scaling["tokens_per_s_1"]))
    assert result["gpu"] == []
    assert "## CPU data-parallel scaling" in printed and "HF Trainer tok/s" in printed
    assert suite.main(["--gpu-impls", "lmlab,deepspeed"]) == 2


def test_memory_probe_in_a_child_process():
    probe = common.run_in_child(common.memory_probe, "lmlab", "tiny", "fp32", 2, 1, 1)
    assert probe["error"] is None
    assert probe["peak_rss"] >= probe["baseline_rss"] > 0


def _gpu_args(*extra: str):
    return suite.parse_args(["--quick", "--gpu-only", "--no-compile", *extra])


def test_gpu_part_rows_on_cpu_without_compile():
    """The GPU part's bookkeeping (runs, FSDP2 through lmlab's own path, MFU, ratios, report) with
    the CPU standing in for the GPU (gloo instead of NCCL)."""
    (row,) = suite.gpu_part(_gpu_args(), torch.device("cpu"))
    assert row["size"] == "tiny" and row["lmlab_compile"] is False
    for impl in suite.GPU_IMPLS:
        assert row[impl]["error"] is None and row[impl]["tokens_per_s"] > 0
        assert row[impl]["mfu"] is None  # no data-sheet peak for a CPU
        expected = row[impl]["tokens_per_s"] * row["training_flops_per_token"] / row["matmul_peak_flops"]
        assert row[impl]["fraction_of_matmul_peak"] == pytest.approx(expected)
    lm, hf = row["lmlab_fsdp"]["tokens_per_s"], row["hf_trainer"]["tokens_per_s"]
    assert row["ratio_lmlab_fsdp_over_hf_trainer"] == pytest.approx(lm / hf)
    assert not torch.distributed.is_initialized()  # the one-process FSDP group was closed
    report = suite.markdown([], None, [row], None)
    assert "| tiny | lmlab (eager) | 2 × 32 |" in report and "| tiny | lmlab (eager, FSDP2 on 1 GPU) |" in report


def test_gpu_row_reports_a_failure_and_the_suite_goes_on(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(common, "hf_llama", out_of_memory)
    (row,) = suite.gpu_part(_gpu_args(), torch.device("cpu"))
    assert row["hf_trainer"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert row["hf_trainer"]["tokens_per_s"] is None and row["ratio_lmlab_over_hf_trainer"] is None
    assert row["lmlab_fsdp"]["error"] is None
    assert row["lmlab"]["error"] is None and row["lmlab"]["tokens_per_s"] > 0
    assert "failed: OutOfMemoryError" in suite.markdown([], None, [row], None)


def test_lora_vs_trl_smoke(tmp_path):
    """``benchmarks/lora_vs_trl.py`` end to end at its smallest: both sides run in their own processes and every
    ratio RESULTS.md quotes is produced."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    import lora_vs_trl

    out = tmp_path / "lora.json"
    argv = ["--d-model", "32", "--layers", "1", "--heads", "2", "--steps", "1", "--warmup", "1", "--examples", "24"]
    argv += [
        "--reps",
        "1",
        "--vocab",
        "300",
        "--model-vocab",
        "512",
        "--seq-len",
        "64",
        "--rank",
        "2",
        "--out",
        str(out),
    ]
    assert lora_vs_trl.main(argv) == 0
    result = json.loads(out.read_text())
    for side in ("lmlab", "trl"):
        assert result["median"][side]["peak_rss"] >= result["median"][side]["rss_at_first_step"] > 0
        assert result["median"][side]["examples_per_s"] > 0
    assert result["peak_memory_ratio"] > 0 and result["speed_ratio"] > 0
