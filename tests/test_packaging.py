import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO


def test_wheel_installs_the_three_folders_under_the_traind_namespace(tmp_path):
    """A regular (non-editable) install maps daemon/, jobs/ and store/ to traind.*."""
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the repo
    for name in ("daemon", "jobs", "store"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("traind-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("daemon", "jobs", "store"):
        assert f"traind/{package}/__init__.py" in names
    assert "traind/__init__.py" not in names  # traind is a namespace
    assert "traind/jobs/spec.py" in names and "traind/daemon/cli.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "traind = traind.daemon.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
