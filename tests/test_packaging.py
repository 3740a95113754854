"""What the wheel ships (the card template and every recipe) and what pyproject.toml requires."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

import hf_subprune
from hf_subprune.outputs import card

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("model_cards", "recipes")  # top-level folders the package reaches through symlinks


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in project["dependencies"]}


def test_wheel_ships_the_card_template_and_every_recipe(tmp_path):
    # Built from a copy (symlinks kept as links), so that the build leaves no build/ or egg-info in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("hf_subprune", *SHIPPED):
        shutil.copytree(ROOT / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path / "whl")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (wheel,) = (tmp_path / "whl").glob("hf_subprune-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        template = "hf_subprune/model_cards/pruned_model.md"
        assert template in names
        assert z.read(template) == (ROOT / "model_cards" / "pruned_model.md").read_bytes()
        recipes = sorted((ROOT / "recipes").glob("*.yaml"))
        assert recipes
        for recipe in recipes:
            assert z.read(f"hf_subprune/recipes/{recipe.name}") == recipe.read_bytes()


def test_installed_package_reaches_template_and_recipes():
    """The same paths work from the checkout (editable install) as from the wheel."""
    package = Path(hf_subprune.__file__).parent
    for name in SHIPPED:
        assert (package / name).is_symlink() and (package / name).resolve() == ROOT / name
    assert card.TEMPLATE.is_file()
    assert {p.name for p in (package / "recipes").glob("*.yaml")} == {p.name for p in (ROOT / "recipes").glob("*.yaml")}


def test_pyproject_requires_torch_2_6_datasets_and_matplotlib():
    requirements = _requirements()
    torch = requirements["torch"]
    assert str(torch.specifier) == ">=2.6"  # an open lower bound: environments choose their torch build
    assert "2.6" in torch.specifier and "2.5.1" not in torch.specifier and "2.13.0" in torch.specifier
    for name in ("datasets", "matplotlib"):
        assert name in requirements and requirements[name].marker is None
