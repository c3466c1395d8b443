"""opd_ext's loss modes inside the real verl (requirements-verl.txt, its own environment made by
scripts/setup_verl_env.sh): tests/verl_checks.py runs verl's distillation loss path there and reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import opd_ext
from opd_ext.objective import TOPK_DIVERGENCES

ROOT = Path(__file__).resolve().parents[1]


def verl_python():
    path = os.environ.get("OPD_VERL_PYTHON") or str(ROOT / ".venv-verl" / "bin" / "python")
    if Path(path).exists():
        return path
    if os.environ.get("OPD_REQUIRE_VERL"):
        pytest.fail(f"OPD_REQUIRE_VERL is set but there is no verl environment at {path}")
    pytest.skip("no verl environment: run scripts/setup_verl_env.sh (scripts/test.sh does)")


def plugin_modes():
    # The plugin module imports verl, which this environment does not have: read its table from source.
    source = (ROOT / "opd_ext" / "integrations" / "verl.py").read_text()
    start = source.index("LOSS_MODES = {")
    table = eval(source[start + len("LOSS_MODES = ") : source.index("}", start) + 1])  # noqa: S307
    assert set(table.values()) == set(TOPK_DIVERGENCES)
    return table


@pytest.fixture(scope="module")
def report():
    result = subprocess.run(
        [verl_python(), str(ROOT / "tests" / "verl_checks.py")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd="/",  # so `import opd_ext` finds the installed package, as in a user's job
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_import_verl_registers_every_mode_through_the_entry_point(report):
    assert report["verl"] == "0.9.1"
    assert {m for m in report["registered"] if m.startswith("opd_ext_")} == set(plugin_modes())


@pytest.mark.parametrize("mode", sorted(plugin_modes()))
def test_each_mode_through_verls_loss_path_equals_opd_ext(report, mode):
    r = report["modes"][mode]
    assert r["loss"] == pytest.approx(r["opd_ext_loss"], rel=1e-6)
    assert r["max_grad_diff"] <= 1e-6 * r["max_grad"]
    assert r["max_grad"] > 0
    assert r["output_shapes"]["distillation_losses"] == r["output_shapes"]["student_mass"] == [1, 27]
    for name in (
        "distillation/student_mass",
        "distillation/teacher_mass",
        "distillation/overlap_ratio",
        "distillation/teacher_entropy",
        "distillation/loss",
    ):
        assert name in r["metrics"], name


def test_forward_mode_equals_verls_own_forward_kl_topk(report):
    r = report["verl_forward_kl_topk"]
    assert r["min_per_token"] > 0  # so verl's clamp at 0 does not act and the two must agree
    assert r["loss"] == pytest.approx(r["opd_ext_loss"], rel=1e-6)
    assert r["max_grad_diff"] <= 1e-6 * r["max_grad"]
    for name, diff in r["max_output_diff"].items():
        assert diff <= 1e-5, name


def test_verls_trainer_config_selects_the_mode(report):
    # ppo_trainer.yaml composed through Hydra with docs/verl.md's overrides, as verl's workers get it.
    assert report["composed"] == {
        "actor": "FSDPActorConfig",
        "strategy": "fsdp2",
        "loss_mode": "opd_ext_reverse_kl_topk_tail",
        "use_topk": True,
        "loss_agg_mode": "token-mean",
    }


def test_unsupported_verl_release_is_refused_with_the_range(report):
    assert ">=0.9,<0.10" in report["old_version_refused"]
    assert "0.8.2" in report["old_version_refused"]


def test_the_plugin_says_what_to_install_without_verl():
    code = "import opd_ext.integrations.verl"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    if result.returncode == 0:
        pytest.skip("verl is installed in this environment")
    assert "pip install" in result.stderr and "verl" in result.stderr
    assert opd_ext.__version__


@pytest.fixture(scope="module")
def megatron_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron") / "report.json"
    result = subprocess.run(
        [verl_python(), str(ROOT / "tests" / "verl_megatron_checks.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def test_megatron_strategy_with_tensor_parallelism_equals_the_unsharded_loss(megatron_report):
    # Two ranks, each with half of the vocabulary, through verl's own Megatron top-k path.
    for mode, r in megatron_report["modes"].items():
        assert r["max_loss_diff"] <= 1e-6 * max(1.0, r["max_loss"]), mode
        assert r["max_grad_diff"] <= 1e-6 * r["max_grad"], mode


def test_megatron_forward_mode_equals_verls_megatron_forward_kl_topk(megatron_report):
    assert megatron_report["real_rows"] < megatron_report["rows"]  # padding rows were present
    for name, diff in megatron_report["opd_ext_vs_verl_forward"].items():
        assert diff <= 1e-5, name
