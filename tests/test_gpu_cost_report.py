"""benchmarks/gpu_cost_report.py's parsers and loop analysis on canned ptxas / cuobjdump text.

No nvcc or cuobjdump run: the snippets below have the tools' real format (sm_90, CUDA 13)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_cost_report as gcr  # noqa: E402

PTXAS = """\
ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_ZN3opd4cuda16token_stats_impl16row_stats_kernelINS1_9PairStatsIN3c108BFloat16ES5_EEEEvT_iPNS7_5StateE' for 'sm_90'
ptxas info    : Function properties for _ZN3opd4cuda16token_stats_impl16row_stats_kernelINS1_9PairStatsIN3c108BFloat16ES5_EEEEvT_iPNS7_5StateE
    8 bytes stack frame, 8 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 192 bytes smem
ptxas info    : Function properties for _ZN50_INTERNAL_33eda746_14_token_stats_cu_cfd157c3_40063opd4cuda16token_stats_impl9recentredENS_16PairSoftmaxStateEff
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compile time = 145.179 ms
ptxas info    : Compiling entry function '_ZN3opd4cuda10drift_impl11scan_kernelILi128EEEvNS0_15DriftScanParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN3opd4cuda10drift_impl11scan_kernelILi128EEEvNS0_15DriftScanParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 400 bytes cmem[0]
ptxas info    : Compile time = 20.010 ms
"""

TOY = "_Z10toy_kernelIN3c108BFloat16ES1_EvPKT_PKT0_Pfi"
NESTED = "_Z13nested_kernelv"

SASS = f"""
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

	code for sm_90
		Function : {TOY}
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                           /* 0x00000a00ff017b82 */
                                                                                                    /* 0x000fe40000000800 */
        /*0010*/                   S2R R0, SR_TID.X ;                                               /* 0x0000000000007919 */
                                                                                                    /* 0x000e220000002100 */
        /*0020*/                   ISETP.GE.AND P0, PT, R0, c[0x0][0x218], PT ;                     /* 0x0000860000007a0c */
                                                                                                    /* 0x001fda0003f06270 */
        /*0030*/               @P0 BRA 0x1a0 ;                                                      /* 0x0000000000580947 */
                                                                                                    /* 0x000fea0003800000 */
        /*0040*/                   LDG.E.EF.128 R4, desc[UR4][R2.64] ;                              /* 0x0000000402047981 */
                                                                                                    /* 0x000ea8000c1e1d00 */
        /*0050*/                   LDG.E.EF.128 R8, desc[UR4][R2.64+0x10] ;                         /* 0x0000100402087981 */
                                                                                                    /* 0x000ee2000c1e1d00 */
        /*0060*/                   FMNMX R12, R4, R5, !PT ;                                         /* 0x00000005040c7209 */
                                                                                                    /* 0x004fc80007800000 */
        /*0070*/                   FSETP.GT.AND P1, PT, R12, R20, PT ;                              /* 0x000000140c00720b */
                                                                                                    /* 0x000fda0003f24000 */
        /*0080*/              @!P1 BRA 0xc0 ;                                                       /* 0x00000000000c9947 */
                                                                                                    /* 0x000fea0003800000 */
        /*0090*/                   MOV R30, 0xb0 ;                                                  /* 0x000000b0001e7802 */
                                                                                                    /* 0x000fe40000000f00 */
        /*00a0*/                   CALL.REL.NOINC 0x1d0 ;                                           /* 0x0000000000487944 */
                                                                                                    /* 0x000fea0003c00000 */
        /*00b0*/                   MOV R20, R12 ;                                                   /* 0x0000000c00147202 */
                                                                                                    /* 0x000fe40000000f00 */
        /*00c0*/                   FADD R21, R4, -R20 ;                                             /* 0x8000001404157221 */
                                                                                                    /* 0x000fc80000000000 */
        /*00d0*/                   MUFU.EX2 R22, R21 ;                                              /* 0x0000001500167308 */
                                                                                                    /* 0x000e240000000800 */
        /*00e0*/                   FADD R23, R23, R22 ;                                             /* 0x0000001617177221 */
                                                                                                    /* 0x001fe20000000000 */
        /*00f0*/                   IADD3 R0, R0, 0x100, RZ ;                                        /* 0x0000010000007810 */
                                                                                                    /* 0x000fc80007ffe0ff */
        /*0100*/                   ISETP.GE.AND P0, PT, R0, c[0x0][0x218], PT ;                     /* 0x0000860000007a0c */
                                                                                                    /* 0x000fda0003f06270 */
        /*0110*/              @!P0 BRA 0x40 ;                                                       /* 0xfffffffc00c88947 */
                                                                                                    /* 0x000fea000383ffff */
        /*0120*/                   LDG.E.EF.128 R4, desc[UR4][R2.64] ;                              /* 0x0000000402047981 */
                                                                                                    /* 0x000ea8000c1e1d00 */
        /*0130*/                   FADD R23, R23, R4 ;                                              /* 0x0000000417177221 */
                                                                                                    /* 0x004fe20000000000 */
        /*0140*/                   IADD3 R0, R0, 0x80, RZ ;                                         /* 0x0000008000007810 */
                                                                                                    /* 0x000fc80007ffe0ff */
        /*0150*/                   ISETP.GE.AND P0, PT, R0, c[0x0][0x21c], PT ;                     /* 0x0000870000007a0c */
                                                                                                    /* 0x000fda0003f06270 */
        /*0160*/              @!P0 BRA 0x120 ;                                                      /* 0xfffffffc00ec8947 */
                                                                                                    /* 0x000fea000383ffff */
        /*0170*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;                                 /* 0x0000000402047981 */
                                                                                                    /* 0x000ea8000c1e1500 */
        /*0180*/                   IMAD.U32 R4, R4, 0x10000, RZ ;                                   /* 0x0001000004047824 */
                                                                                                    /* 0x004fca00078e00ff */
        /*0190*/            BRA !P2, 0x170 ;                                                        /* 0x0000000000f47947 */
                                                                                                    /* 0x000fea0005000000 */
        /*01a0*/                   STG.E desc[UR4][R6.64], R23 ;                                    /* 0x0000001706007986 */
                                                                                                    /* 0x000fe2000c101904 */
        /*01b0*/                   EXIT ;                                                           /* 0x000000000000794d */
                                                                                                    /* 0x000fea0003800000 */
        /*01c0*/                   BRA 0x1c0;                                                       /* 0xfffffffc00fc7947 */
                                                                                                    /* 0x000fc0000383ffff */
        /*01d0*/                   FMUL R23, R23, 0.5 ;                                             /* 0x3f00000017177820 */
                                                                                                    /* 0x000fe20000400000 */
        /*01e0*/                   RET.REL.NODEC R30 0x0 ;                                          /* 0xfffffe101e007950 */
                                                                                                    /* 0x000fea0003c3ffff */
		..........


		Function : {NESTED}
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   MOV R0, RZ ;                                                     /* 0x000000ff00007202 */
                                                                                                    /* 0x000fe20000000f00 */
        /*0010*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;                        /* 0x0000000402047981 */
                                                                                                    /* 0x000ea8000c1e9d00 */
        /*0020*/                   LDG.E.64.CONSTANT R8, desc[UR4][R2.64+0x10] ;                    /* 0x0000100402087981 */
                                                                                                    /* 0x000ea8000c1e9b00 */
        /*0030*/               @P0 BRA 0x20 ;                                                       /* 0xfffffffc00f80947 */
                                                                                                    /* 0x000fea000383ffff */
        /*0040*/               @P1 BRA 0x10 ;                                                       /* 0xfffffffc00f01947 */
                                                                                                    /* 0x000fea000383ffff */
        /*0050*/                   EXIT ;                                                           /* 0x000000000000794d */
                                                                                                    /* 0x000fea0003800000 */
        /*0060*/                   BRA 0x60;                                                        /* 0xfffffffc00fc7947 */
                                                                                                    /* 0x000fc0000383ffff */
		..........
"""


def test_parse_ptxas_resources_spills_and_callees():
    k = gcr.parse_ptxas(PTXAS)
    assert len(k) == 2
    stats = k["_ZN3opd4cuda16token_stats_impl16row_stats_kernelINS1_9PairStatsIN3c108BFloat16ES5_EEEEvT_iPNS7_5StateE"]
    assert (stats["registers"], stats["stack_frame"], stats["spill_stores"], stats["spill_loads"]) == (64, 8, 8, 20)
    assert (stats["barriers"], stats["smem"], stats["cumulative_stack"], stats["arch"]) == (1, 192, 8, "sm_90")
    # The noinline callee's line is kept apart from the kernel's own spills.
    assert list(stats["callees"].values()) == [{"stack_frame": 0, "spill_stores": 0, "spill_loads": 0}]
    scan = k["_ZN3opd4cuda10drift_impl11scan_kernelILi128EEEvNS0_15DriftScanParamsE"]
    assert (scan["registers"], scan["spill_stores"], scan["smem"], scan["cmem0"]) == (32, 0, 0, 400)
    assert scan["barriers"] == 0 and scan["callees"] == {}


def test_parse_sass_functions_guards_and_targets():
    fns = gcr.parse_sass(SASS)
    assert list(fns) == [TOY, NESTED]
    toy = fns[TOY]
    assert len(toy) == 31 and toy[0].addr == 0 and toy[-1].addr == 0x1E0
    by_addr = {i.addr: i for i in toy}
    assert by_addr[0x30].guard == "@P0" and by_addr[0x30].target == 0x1A0 and by_addr[0x30].conditional
    assert by_addr[0x40].opcode == "LDG.E.EF.128" and by_addr[0x40].operands == "R4, desc[UR4][R2.64]"
    assert by_addr[0x190].guard == "" and by_addr[0x190].conditional  # predicate operand: BRA !P2, target
    assert by_addr[0x1C0].target == 0x1C0 and not by_addr[0x1C0].conditional
    assert by_addr[0xA0].base == "CALL" and by_addr[0xA0].target == 0x1D0
    assert by_addr[0x1E0].target is None


@pytest.mark.parametrize(
    "opcode, size",
    [
        ("LDG.E.EF.128", 16),
        ("LDG.E.128.CONSTANT", 16),
        ("LDG.E.64.CONSTANT", 8),
        ("LDG.E.U16", 2),
        ("LDG.E.U8", 1),
        ("LDG.E", 4),
        ("STG.E.EF.128", 16),
        ("LDG.E.LTC128B.128", 16),
        ("LDG.E.LTC128B", 4),
    ],
)
def test_access_bytes(opcode, size):
    assert gcr.access_bytes(opcode) == size


def test_find_loops_keeps_innermost_vector_loops():
    fns = gcr.parse_sass(SASS)
    # The scalar (LDG.E.U16) loop at 0x170 and the self-branch at 0x1c0 are no streaming loops.
    assert [(lp.head, lp.tail) for lp in gcr.find_loops(fns[TOY])] == [(0x40, 0x110), (0x120, 0x160)]
    # Nested loops that both load: only the inner one.
    assert [(lp.head, lp.tail) for lp in gcr.find_loops(fns[NESTED])] == [(0x20, 0x30)]


def test_hot_path_skips_the_cold_call_and_counts_loads():
    toy = gcr.parse_sass(SASS)[TOY]
    main = gcr.find_loops(toy)[0]
    path = gcr.hot_path(toy, main)
    assert [i.addr for i in path.instructions] == [0x40, 0x50, 0x60, 0x70, 0x80, 0xC0, 0xD0, 0xE0, 0xF0, 0x100, 0x110]
    assert path.range_instructions == 14
    assert path.load_bytes == 32 and path.store_bytes == 0
    assert path.opcodes(gcr.is_global_load) == "2×LDG.E.EF.128"


def test_analyse_elements_rates_and_hot_loop_choice():
    fns = gcr.parse_sass(SASS)
    ptxas = {TOY: next(iter(gcr.parse_ptxas(PTXAS).values()))}
    names = {
        TOY: "void toy_ns::toy_kernel<c10::BFloat16, c10::BFloat16>"
        "(c10::BFloat16 const*, c10::BFloat16 const*, float*, int)",
        NESTED: "nested_kernel()",
    }
    kernels = gcr.analyse(ptxas, fns, names, "csrc/cuda/toy.cu")
    toy = next(k for k in kernels if k["mangled"] == TOY)
    assert toy["kernel"] == "toy_ns::toy_kernel<bf16, bf16>" and toy["dtypes"] == "bf16/bf16"
    assert toy["hot_loops"] == [0]  # 32 load bytes per iteration beat the remainder loop's 16
    lp = toy["loops"][0]
    assert lp["range"] == ["0x0040", "0x0110"]
    assert lp["elements"] == 8  # 32 bytes / (2 + 2) bytes per element pair
    assert lp["instructions_per_element"] == pytest.approx(11 / 8)
    assert lp["mufu_per_element"] == pytest.approx(1 / 8)
    assert lp["bytes_per_element"] == 4
    h100 = lp["bounds"]["H100 SXM"]
    assert h100["rates"]["issue"] == pytest.approx(132 * 4 * 1.755e9 * 32 / (11 / 8))
    assert h100["rates"]["memory"] == pytest.approx(3.35e12 / 4)
    assert h100["bound"] == "memory" and h100["fraction_of_floor"] == 1.0
    nested = next(k for k in kernels if k["mangled"] == NESTED)
    assert nested["dtypes"] == "" and nested["loops"][0]["elements"] is None  # no dtype: elements unknown
    assert "bounds" not in nested["loops"][0]

    report = {
        "arch": "90",
        "sources": {"commit": "abc1234", "dirty": False},
        "tools": {"nvcc_version": "13.0.88", "cuobjdump_version": "13.1.80"},
        "kernels": kernels,
    }
    md = gcr.markdown(report)
    assert "not yet run on a GPU" in md and "0x0040–0x0110" in md and "| 64 | 8 | 8 | 20 | 192 |" in md


def test_issue_bound_when_instructions_dominate():
    loop = {"instructions_per_element": 72.0, "mufu_per_element": 2.0, "bytes_per_element": 4.0}
    b = gcr.bounds(loop)
    for gpu, g in gcr.GPUS.items():
        issue = g["sms"] * 4 * g["clock_ghz"] * 1e9 * 32 / 72.0
        assert b[gpu]["bound"] == "issue" and b[gpu]["rate"] == pytest.approx(issue)
        assert b[gpu]["fraction_of_floor"] == pytest.approx(issue / (g["hbm_tbps"] * 1e12 / 4.0))
        assert b[gpu]["issue_use_at_floor"] > 1
    # MUFU-bound: few instructions, many transcendental ones.
    mufu_heavy = {"instructions_per_element": 8.0, "mufu_per_element": 8.0, "bytes_per_element": 1.0}
    assert gcr.bounds(mufu_heavy)["H200"]["bound"] == "mufu"


@pytest.mark.parametrize(
    "demangled, short, dtypes",
    [
        (
            "void opd::cuda::token_stats_impl::row_stats_kernel<opd::cuda::token_stats_impl::PairStats<c10::BFloat16, "
            "float> >(opd::cuda::token_stats_impl::PairStats<c10::BFloat16, float>, int, "
            "opd::cuda::token_stats_impl::PairStats<c10::BFloat16, float>::State*)",
            "token_stats_impl::row_stats_kernel<PairStats<bf16, fp32>>",
            ["bf16", "fp32"],
        ),
        (
            "void opd_ext::cuda_kernels::(anonymous namespace)::drift_step_kernel<c10::Half, float>(c10::Half const*, "
            "float const*, long, long, int, opd_ext::cuda_kernels::(anonymous namespace)::StepArgs)",
            "cuda_kernels::drift_step_kernel<fp16, fp32>",
            ["fp16", "fp32"],
        ),
        (
            "void opd::cuda::drift_impl::scan_kernel<128>(opd::cuda::DriftScanParams)",
            "drift_impl::scan_kernel<128>",
            [],
        ),
        (
            "opd_ext::cuda_kernels::(anonymous namespace)::topk_overlap_merge_kernel(float const*, int const*, "
            "int const*, int, int, float*)",
            "cuda_kernels::topk_overlap_merge_kernel",
            [],
        ),
    ],
)
def test_kernel_name(demangled, short, dtypes):
    assert gcr.kernel_name(demangled) == (short, dtypes)
    assert "bf16" not in gcr.generic_name(short) and "fp32" not in gcr.generic_name(short)


def test_missing_nvcc_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(gcr, "find_tool", lambda *a, **k: None)
    assert gcr.main(["--out", "unused"]) == 1
    assert "nvcc not found" in capsys.readouterr().err


def test_missing_cuobjdump_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(gcr, "find_tool", lambda tool, *a, **k: "/usr/bin/nvcc" if tool == "nvcc" else None)
    with pytest.raises(gcr.ReportError, match="cuobjdump not found"):
        gcr.find_tools()


def test_cubin_command_rewrites_the_build_command():
    entry = {
        "command": 'nvcc -DX=\\"1\\" -I/src -O3 "--generate-code=arch=compute_90,code=[sm_90]" -x cu '
        "-MD -MT a.o -MF a.o.d -c /src/a.cu -o CMakeFiles/a.cu.o",
        "directory": "/b",
    }
    cmd = gcr.cubin_command(entry, Path("/tmp/a.cubin"))
    assert cmd[:3] == ["nvcc", "-Xptxas", "-v"] and cmd[-2:] == ["-o", "/tmp/a.cubin"]
    assert "-cubin" in cmd and "-c" not in cmd and "-MD" not in cmd and "a.o.d" not in cmd
    assert '-DX="1"' in cmd and "--generate-code=arch=compute_90,code=[sm_90]" in cmd
