import pytest
import torch

import opd_ext

CUDA_READY = torch.cuda.is_available() and opd_ext.cuda_kernels_available()

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device and opd_ext's CUDA kernels"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
