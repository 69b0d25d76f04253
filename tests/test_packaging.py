"""The built wheel is complete: it holds every shipped weight at any depth and the kernel sources, and an
installed copy generates (mulo, LIIF --scale 2) from outside the checkout. Slow-ish (about a minute): it
builds, installs into a fresh venv and runs the CLI twice."""
import glob
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv that sees this interpreter's packages (torch, diffusers, ...) through a plain path line,
    so the checkout's editable install is not loaded and ``vargen`` comes from the wheel alone."""
    tmp = tmp_path_factory.mktemp("wheel")
    env_dir = tmp / "venv"
    assert _run([sys.executable, "-m", "venv", str(env_dir)]).returncode == 0
    python = str(env_dir / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    with open(os.path.join(site, "project_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    if _run([python, "-c", "import wheel"]).returncode != 0:  # setuptools < 70.1 builds wheels through it
        if _run([python, "-m", "pip", "install", "-q", "wheel"]).returncode != 0:
            pytest.skip("building a wheel needs the 'wheel' package and none could be installed")
    return tmp, python


def test_wheel_ships_everything_and_runs_from_outside_the_checkout(venv):
    tmp, python = venv
    build = _run([python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), ROOT],
                 cwd=ROOT)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = glob.glob(str(tmp / "vargen-*.whl"))[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {os.path.relpath(os.path.join(d, f), ROOT) for sub in ("vargen/weights", "vargen/csrc")
               for d, _, fs in os.walk(os.path.join(ROOT, sub)) for f in fs}
    assert shipped and not shipped - names, sorted(shipped - names)
    assert "vargen/weights/scenes-t2i/mulo/drafter/config.json" in names and "vargen/csrc/vargen_ops.cpp" in names
    # --ignore-installed: the project venv's editable vargen is visible on the path and would count as installed
    assert _run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel]).returncode == 0

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    where = _run([python, "-c", "import vargen; print(vargen.__file__)"], cwd=str(tmp), env=env).stdout
    assert where.startswith(str(tmp)), where  # the installed copy, not the checkout
    for extra in (["--method", "mulo"], ["--scale", "2"]):
        out = tmp / f"{extra[1]}.png"
        run = _run([python, "-m", "vargen.cli", "generate", "a red circle", "--quiet", "-o", str(out), *extra],
                   cwd=str(tmp), env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        assert out.exists()
