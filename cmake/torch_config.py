"""Print what CMake needs to compile against the torch of this interpreter, as KEY=VALUE lines.

Querying torch directly (instead of find_package(Torch)) avoids Caffe2's CUDA discovery, which
fails on partial toolkits where nvrtc/cublas live in pip's nvidia/* packages rather than in
/usr/local/cuda.
"""

import glob
import os
import sys

import torch
from torch.utils import cpp_extension


def nvidia_pip_dirs(sub):
    """Include/lib dirs of the nvidia-* pip wheels torch depends on (cu13 layout and older)."""
    dirs = []
    for entry in sys.path:
        root = os.path.join(entry, "nvidia")
        if os.path.isdir(root):
            dirs += sorted(glob.glob(os.path.join(root, "cu*", sub)))
            dirs += sorted(glob.glob(os.path.join(root, "*", sub)))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def visible_arch():
    try:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}{minor}"
    except Exception:  # a driverless machine must still configure
        pass
    return ""


fields = {
    "TORCH_VERSION": torch.__version__,
    "TORCH_CUDA_VERSION": torch.version.cuda or "",
    "TORCH_INCLUDE_DIRS": ";".join(cpp_extension.include_paths()),
    "TORCH_LIBRARY_DIR": os.path.join(os.path.dirname(torch.__file__), "lib"),
    "TORCH_CXX11_ABI": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
    "NVIDIA_PIP_INCLUDE_DIRS": ";".join(nvidia_pip_dirs("include")),
    "NVIDIA_PIP_LIBRARY_DIRS": ";".join(nvidia_pip_dirs("lib")),
    "VISIBLE_CUDA_ARCH": visible_arch(),
}
for key, value in fields.items():
    print(f"{key}={value}")
