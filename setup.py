"""Package list for the single ``securefed`` namespace.

``protocols/`` and ``attacks/`` live at the top of the repository but install as
``securefed.protocols`` and ``securefed.attacks`` (see ``package-dir`` in
pyproject.toml). ``find_packages`` cannot see through that mapping, so the list is
computed here; everything else is declared in pyproject.toml.
"""

from setuptools import find_packages, setup


def _tree(root: str, prefix: str) -> list[str]:
    return [prefix] + [f"{prefix}.{name}" for name in find_packages(root)]


setup(
    packages=_tree("securefed", "securefed")
    + _tree("protocols", "securefed.protocols")
    + _tree("attacks", "securefed.attacks"),
)
