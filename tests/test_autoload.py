"""The zero-code route: after ``pip install`` (editable, as this venv has it, and a real wheel
into a throwaway environment), a script that never imports ember_ds gets Ember from a ds_config;
start-up imports nothing; EMBER_DS_NO_AUTOLOAD=1 switches it off with an error that names the
fix. Every check runs a fresh interpreter in a subprocess."""
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from ember_ds import _autoload
from tests.conftest import DIST, ROOT, free_port

SCRIPT = DIST / "autoload_script.py"


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", _autoload.OFF_VAR, "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_script(python, tmp_path, **env):
    """Run the ember_ds-free training script with ``python`` (outside the repository, so the
    package can only come from site-packages); return (process, the JSON it wrote or None)."""
    out = tmp_path / "out.json"
    proc = subprocess.run([str(python), str(SCRIPT), str(out), str(free_port())], cwd=tmp_path,
                          env=_env(**env), capture_output=True, text=True, timeout=300)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def check_trained_with_ember(proc, res, site_dir=None):
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert res["ember_ds_before_deepspeed"] is False     # the script never imports it ...
    assert res["ember_ds_after_deepspeed"] is True       # ... importing deepspeed did
    assert res["optimizer"] == "ember_ds.optimizer.Ember"
    assert res["tables"] == ["out.weight", "tok.weight"]
    assert res["tok_moved"] > 0 and res["losses"][-1] < res["losses"][0]
    if site_dir is not None:
        assert Path(res["ember_ds_file"]).resolve().is_relative_to(Path(site_dir).resolve())


def installed_pth():
    for d in site.getsitepackages():
        p = Path(d, _autoload.PTH_NAME)
        if p.exists():
            return p
    return None


def test_pth_is_installed_and_current():
    p = installed_pth()
    assert p is not None, (f"{_autoload.PTH_NAME} is not in site-packages: install the project "
                           f"(pip install -e .)")
    assert p.read_text() == _autoload.pth_line(), (
        f"{p} is stale (it is written at install time): reinstall, pip install -e .")


def test_startup_imports_nothing_and_installs_one_finder(tmp_path):
    code = ("import sys, json; print(json.dumps([sorted(sys.modules), "
            "sum(hasattr(f, 'ember_ds_hook') for f in sys.meta_path)]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=60)
    modules, hooks = json.loads(proc.stdout)
    assert hooks == 1   # once, though a 3.11 venv runs site-packages' .pth files twice
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "deepspeed", "ember_ds", "numpy")]
    assert heavy == [], heavy


@pytest.mark.dist
def test_script_without_import_ember_ds_gets_ember(tmp_path):
    proc, res = run_script(sys.executable, tmp_path)
    check_trained_with_ember(proc, res)


@pytest.mark.dist
def test_switched_off_the_error_names_the_fix(tmp_path):
    proc, res = run_script(sys.executable, tmp_path, **{_autoload.OFF_VAR: "1"})
    assert proc.returncode != 0
    assert res == {"ember_ds_before_deepspeed": False, "ember_ds_after_deepspeed": False}
    line = [ln for ln in proc.stderr.splitlines() if "AssertionError" in ln][-1]
    assert "Ember is not a supported DeepSpeed Optimizer" in line
    assert "import ember_ds" in line and _autoload.OFF_VAR in line


def _source_copy(dst: Path) -> Path:
    """The project's packaging inputs, copied: building never writes into the checkout."""
    pytest.importorskip("setuptools", reason="building the project offline needs setuptools")
    src = dst / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("ember_ds", "models", "launch"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _throwaway_venv(path: Path):
    """A venv on the same base Python whose dependencies (torch, deepspeed, ...) are this venv's
    site-packages, added as a plain path: its .pth files (this checkout's editable install and
    hook) are not processed there, so ember_ds can only come from what is installed into it."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    py = path / "bin" / "python"
    sp = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                        capture_output=True, text=True, check=True).stdout.strip()
    Path(sp, "zz_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return py, Path(sp)


def _pip(python, *args, cwd):
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "-q",
                    "--disable-pip-version-check", *args], check=True, cwd=cwd, timeout=300,
                   env=_env(DS_BUILD_OPS="0"))


@pytest.mark.dist
def test_wheel_install_carries_the_hook(tmp_path):
    src = _source_copy(tmp_path)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "-w", str(wheels), str(src)], check=True,
                   cwd=tmp_path, timeout=300, env=_env())
    (wheel,) = wheels.glob("ember_ds-*.whl")
    py, sp = _throwaway_venv(tmp_path / "venv")
    _pip(py, "install", "--no-deps", "--no-index", str(wheel), cwd=tmp_path)
    assert (sp / _autoload.PTH_NAME).read_text() == _autoload.pth_line()
    proc, res = run_script(py, tmp_path)
    check_trained_with_ember(proc, res, site_dir=sp)
    _pip(py, "uninstall", "-y", "ember-ds", cwd=tmp_path)   # RECORD lists the .pth
    assert not (sp / _autoload.PTH_NAME).exists() and not (sp / "ember_ds").exists()


@pytest.mark.dist
def test_fresh_editable_install_carries_the_hook(tmp_path):
    src = _source_copy(tmp_path)
    py, sp = _throwaway_venv(tmp_path / "venv")
    _pip(py, "install", "--no-deps", "--no-index", "--no-build-isolation", "-e", str(src),
         cwd=tmp_path)
    assert (sp / _autoload.PTH_NAME).read_text() == _autoload.pth_line()
    code = "import sys; print(sum(hasattr(f, 'ember_ds_hook') for f in sys.meta_path))"
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["1"], out


@pytest.mark.dist
def test_hook_without_ember_ds_leaves_deepspeed_alone(tmp_path):
    """The .pth present but ember_ds gone (say an editable checkout deleted): deepspeed still
    imports, and the hook takes itself off sys.meta_path."""
    py, sp = _throwaway_venv(tmp_path / "venv")
    (sp / _autoload.PTH_NAME).write_text(_autoload.pth_line())
    code = ("import sys; n = sum(hasattr(f, 'ember_ds_hook') for f in sys.meta_path); "
            "import deepspeed; print(n, sum(hasattr(f, 'ember_ds_hook') for f in sys.meta_path),"
            " 'ember_ds' in sys.modules, deepspeed.__version__)")
    proc = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-4:-1] == ["1", "0", "False"], proc.stdout
