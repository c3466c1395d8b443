import zlib

import pytest
import torch

import opd_ext
import opd_ext.testing
from opd_ext import reference

CUDA_READY = torch.cuda.is_available() and opd_ext.cuda_kernels_available()
SIMT_READY = opd_ext.testing.simt_available()

# (student dtype, teacher dtype): every pair the kernels take (docs/spec.md §2), including float32 beside
# a low-precision dtype on either side. Tests that pick pairs by index rely on this order.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
]
# The outputs of ops.token_stats, in order.
STAT_FIELDS = (
    "student_logprob",
    "teacher_logprob",
    "reverse_kl",
    "forward_kl",
    "topk_reverse_kl",
    "student_lse",
    "teacher_lse",
)


def assert_stats_match_reference(got: dict, student, teacher, tokens, temperature=1.0, topk=0, fields=STAT_FIELDS):
    """ops.token_stats outputs (by field name) against the float64 reference, within docs/spec.md §4.
    Kernels are compared with the reference, not with each other: two float32 approximations
    would need twice the tolerance."""
    want = reference.token_stats(student, teacher, tokens, temperature, topk)
    for name in fields:
        if name == "topk_reverse_kl" and topk == 0:
            assert got[name].numel() == 0
            continue
        assert got[name].dtype == torch.float32 and got[name].shape == tokens.shape, name
        torch.testing.assert_close(
            got[name].double(),
            want[name],
            **stat_tolerance(student.dtype),
            equal_nan=True,
            msg=lambda m: f"{name}: {m}",
        )


def stat_tolerance(dtype):
    """docs/spec.md §4: float32 rel 1e-5 (abs 1e-6 near 0); low precision vs the reference on the same
    rounded inputs, rel 1e-4."""
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-6)


def pytest_addoption(parser):
    parser.addoption(
        "--simt-full",
        action="store_true",
        help="run every device-parametrised test on the emulated CUDA device under every device "
        "profile x schedule (default: one profile and schedule per test, rotating across tests)",
    )


def _emu_params(full: bool):
    marks = [pytest.mark.emu, pytest.mark.skipif(not SIMT_READY, reason="opd_ext was built without the SIMT emulator")]
    if not full:
        return [pytest.param("emu", marks=marks)]
    return [
        pytest.param(f"emu-{d}-{s}", marks=marks)
        for d in opd_ext.testing.DEVICE_PROFILES
        for s in opd_ext.testing.SCHEDULES
    ]


def _parametrizes_device_itself(metafunc) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if "device" in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames and not _parametrizes_device_itself(metafunc):
        devices = [
            "cpu",
            pytest.param(
                "cuda",
                marks=[
                    pytest.mark.cuda,
                    pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device and opd_ext's CUDA kernels"),
                ],
            ),
        ]
        full = metafunc.config.getoption("--simt-full")
        if full or metafunc.definition.get_closest_marker("emu_heavy") is None:
            devices += _emu_params(full)
        metafunc.parametrize("device", devices, indirect=True)


def skip_if_emulated(why: str):
    """For tests of the dispatcher registration itself (opcheck, torch.compile), which the emulated
    device's Python dispatch mode would stand in the way of; they run on cpu and cuda."""
    if opd_ext.testing.emulating():
        pytest.skip(f"not on the emulated device: {why}")


def emulator_settings(param: str, nodeid: str):
    """(profile, schedule, seed) of an emulated-device test: spelled out in its id under
    --simt-full, otherwise rotated by a hash of the test id so a CI run covers every profile and
    schedule across the suite (the same test always gets the same ones)."""
    if param != "emu":
        _, profile, schedule = param.split("-")
        return profile, schedule, 1
    h = zlib.crc32(nodeid.encode())
    profiles, schedules = opd_ext.testing.DEVICE_PROFILES, opd_ext.testing.SCHEDULES
    return profiles[h % len(profiles)], schedules[(h // len(profiles)) % len(schedules)], h % 97


@pytest.fixture
def device(request):
    """ "cpu", "cuda", or an emulated CUDA device: CPU tensors whose opd_ext ops run the CUDA
    kernels in the SIMT emulator (the test sees "cpu")."""
    param = request.param
    if not param.startswith("emu"):
        yield param
        return
    profile, schedule, seed = emulator_settings(param, request.node.nodeid)
    with opd_ext.testing.emulated_cuda(device=profile, schedule=schedule, seed=seed):
        yield "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
