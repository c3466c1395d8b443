"""The benchmark harness, the report and gpu_verify.sh's CPU path (no timing assertions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_topk_overlap  # noqa: E402
import report  # noqa: E402

import harness  # noqa: E402

CPU = torch.device("cpu")


def test_interleaved_timing_shapes_and_paired_speedup():
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    impls = {"a": harness.Impl(lambda: bump("a")), "b": harness.Impl(lambda: bump("b"))}
    samples = harness.time_interleaved(impls, CPU, rounds=3, warmup=1, round_budget_s=1e-3, max_inner=4)
    for name in impls:
        assert len(samples[name]) == 3
        assert all(1 <= len(r) <= 4 and all(t > 0 for t in r) for r in samples[name])
        assert calls[name] == 1 + sum(len(r) for r in samples[name])
    baseline = [[4.0, 6.0], [10.0], [3.0]]
    subject = [[1.0], [2.0, 2.0], [3.0]]
    assert harness.paired_speedup(baseline, subject) == 5.0  # per-round ratios 5, 5, 1


def test_setup_runs_outside_the_timed_call_before_every_call():
    log = []
    impl = harness.Impl(lambda: log.append("call"), setup=lambda: log.append("setup"))
    harness.time_interleaved({"x": impl}, CPU, rounds=2, warmup=1, round_budget_s=1e-3, max_inner=2)
    assert log[0] == "setup" and all(a != b for a, b in zip(log, log[1:]))


def test_case_round_trips_through_json():
    case = harness.Case((8, 129), torch.bfloat16, {"k": 16}, "fwd+bwd")
    assert harness.Case.from_json(case.to_json()) == case


def test_missing_ops_name_what_is_missing():
    assert "opd_ext.no_such_op" in harness.missing_ops(CPU, ["no_such_op"], [])
    assert "opd_ext::no_such_kernel has no CPU kernel" in harness.missing_ops(CPU, [], ["no_such_kernel"])
    assert harness.missing_ops(CPU, ["topk_overlap"], ["topk_overlap"]) is None


def test_copy_ceiling_is_measured():
    assert harness.copy_ceiling_gbps("cpu") > 0.1


def test_quick_run_writes_rows_with_metadata_and_report(tmp_path, capsys):
    argv = [
        "--device",
        "cpu",
        "--quick",
        "--dtypes",
        "fp32",
        "--shapes",
        "4x1000",
        "--rounds",
        "1",
        "--round-budget",
        "0.01",
        "--out-dir",
        str(tmp_path),
    ]
    assert (
        harness.main(
            op="topk_overlap",
            script=bench_topk_overlap.__file__,
            description="",
            api=["topk_overlap"],
            kernels=["topk_overlap"],
            cases=bench_topk_overlap.cases,
            build=bench_topk_overlap.build,
            extra_args=bench_topk_overlap.extra_args,
            argv=argv,
        )
        == 0
    )
    rows = harness.read_csv(tmp_path / "topk_overlap-cpu-quick.csv")
    assert [r["impl"] for r in rows] == ["opd_ext", "eager", "torch_topk"]
    for row in rows:
        assert row["status"] == "ok"
        assert int(row["floor_bytes"]) == 2 * 4 * 1000 * 4
        assert row["shape"] == "4x1000" and row["dtype"] == "fp32" and row["params"] == "k=16"
        for field in ("device_name", "torch", "opd_ext", "git_commit", "time_ms", "gbps", "pct_of_ceiling"):
            assert row[field], field
    assert float(rows[0]["opd_ext_speedup"]) == 1.0
    assert (tmp_path / "topk_overlap-cpu-quick.png").stat().st_size > 0

    md = tmp_path / "README.md"
    md.write_text("# notes kept\n")
    assert report.main(["--results", str(tmp_path), "--include-quick", "--md", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# notes kept\n") and "| 4x1000 | fp32 | fwd | k=16 |" in text
    report.main(["--results", str(tmp_path), "--include-quick", "--md", str(md)])
    assert md.read_text().count(report.BEGIN) == 1  # regenerated in place, not appended


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_sees_the_reference_sort_and_not_the_kernel():
    rows, vocab = 32, 50000
    case = harness.Case((rows, vocab), torch.float32, {"k": 16})
    script = Path(bench_topk_overlap.__file__)
    eager = harness._cpu_peak_bytes_subprocess(script, case, "eager")
    fused = harness._cpu_peak_bytes_subprocess(script, case, "opd_ext")
    # The reference keeps the int64 sort indices of both rows alive (>= 16 bytes per logit, plus
    # float copies); RSS accounting is coarse, so assert half of that. The kernel needs O(k) per row.
    assert eager >= rows * vocab * 8
    assert fused < rows * vocab


def test_gpu_verify_runs_on_cpu_and_says_what_it_skips(tmp_path):
    out = tmp_path / "out"
    # VERIFY_WORK: this test also runs inside gpu_verify.sh's own test step, whose scratch it must not wipe.
    env = dict(
        os.environ,
        OUT=str(out),
        VERIFY_WORK=str(tmp_path / "work"),
        VERIFY_INSTALL="skip",
        VERIFY_STEPS="info,cuda-tests,memcheck,report",
        PYTHON=sys.executable,
        PYTHONPATH=str(REPO),
        CUDA_VISIBLE_DEVICES="",
    )
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks/gpu_verify.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table is printed last
    assert "| info | PASS |" in summary
    assert "| memcheck | SKIP | 0 | no GPU visible |" in summary
    assert "| cuda-tests | SKIP |" in summary
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.md", "verify.log", "details.tar.gz"} <= set(files)


def test_dtypes_take_torch_names_and_name_unknown_ones():
    args = harness.parse_args(["--dtypes", "float32,torch.bfloat16,fp16"], "x", None)
    assert args.dtypes == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(SystemExit):
        harness.parse_args(["--dtypes", "float64"], "x", None)
