"""The wheel carries what an installed (not editable) plugin needs: hparams YAMLs and the demo edits."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_hparams_and_a_wheel_install_finds_them(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "easyedit_nmke", source / "easyedit_nmke", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
         "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("easyedit_nmke-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "easyedit_nmke" / "hparams").rglob("*.yaml")}
    assert shipped and shipped <= names
    assert "easyedit_nmke/data/demo_edits.json" in names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    workdir = tmp_path / "elsewhere"  # no ./hparams here
    workdir.mkdir()
    code = (
        "from easyedit_nmke.cli import default_hparams_path\n"
        "from easyedit_nmke.evaluate.bench import default_hparams_root\n"
        "path = default_hparams_path()\n"
        "print(path.is_file(), path.resolve().is_relative_to(%r), (default_hparams_root() / 'baselines').is_dir())\n"
        % str(site.resolve())
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=workdir, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["True", "True", "True"]
