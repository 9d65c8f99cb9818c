"""The distribution installs one top-level package, ``securefed``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_layout() -> None:
    for name in ("securefed", "protocols", "attacks", "benchmarks", "tests", "docs", "pyproject.toml"):
        assert (ROOT / name).exists(), name


def test_wheel_has_single_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("securefed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"securefed"}
    for must in (
        "securefed/py.typed",
        "securefed/configs/default.toml",
        "securefed/protocols/base.py",
        "securefed/protocols/plaintext.py",
        "securefed/attacks/__init__.py",
        "securefed/fl/runner.py",
    ):
        assert must in names, must
    assert not any(n.startswith(("protocols/", "attacks/", "tests/")) for n in names)


def test_subpackages_import_under_one_namespace() -> None:
    import securefed.attacks
    import securefed.protocols

    assert Path(securefed.protocols.__file__).parent == ROOT / "protocols"
    assert Path(securefed.attacks.__file__).parent == ROOT / "attacks"
