"""`pip wheel` gives a cp310-abi3 wheel that pins its torch, installs into another environment and
works there.

Building a wheel from scratch takes minutes, so this runs only where scripts/setup_env.sh has just
built opd_ext (scripts/test.sh, hence CI): it exports the CMake folder and the settings of that
build, and the wheel reuses them, compiling nothing.
"""

import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD_DIR = os.environ.get("OPD_EXT_BUILD_DIR")

pytestmark = [
    pytest.mark.skipif(not BUILD_DIR, reason="needs the build of scripts/setup_env.sh (run scripts/test.sh)"),
    pytest.mark.skipif(bool(sysconfig.get_config_var("Py_GIL_DISABLED")), reason="no stable ABI here"),
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-build-isolation",
            "--no-deps",
            str(ROOT),
            "-C",
            f"build-dir={BUILD_DIR}",
            "-w",
            str(out),
        ],
        check=True,
    )
    (path,) = out.glob("*.whl")
    return path


def test_wheel_is_abi3_and_pins_its_torch(wheel):
    assert wheel.name.startswith("opd_ext-") and "-cp310-abi3-" in wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "opd_ext/_C.abi3.so" in names
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}" in meta.splitlines()


def test_wheel_installs_and_runs_in_another_environment(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], check=True
    )
    # The same torch, without installing it again: this environment's site-packages, listed after the
    # new one's (a .pth there is read, while the editable opd_ext's own .pth here is not).
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    torch_site = pathlib.Path(torch.__file__).resolve().parents[1]
    pathlib.Path(site, "torch_from_the_test_environment.pth").write_text(f"{torch_site}\n")
    code = (
        "import json, torch, opd_ext\n"
        "s = torch.randn(3, 50); t = torch.randn(3, 50)\n"
        "ok = torch.allclose(opd_ext.topk_overlap(s, t, k=5).double(),\n"
        "                    opd_ext.reference.topk_overlap(s, t, k=5).double())\n"
        "print(json.dumps({'ok': ok, 'info': opd_ext.build_info()}))\n"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["ok"]
    info = result["info"]
    assert pathlib.Path(info["extension_path"]).is_relative_to(venv)
    assert info["extension_path"].endswith("_C.abi3.so") and info["python_limited_api"] == "3.10"
    assert info["torch_built_against"] == torch.__version__
