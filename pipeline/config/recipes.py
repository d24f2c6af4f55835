"""Where config files are found: recipes by path or name (``--recipe cpvt_b``), the one rule that ``--model X``
without ``--recipe`` trains ``recipes/X.yaml`` (site recipe folders first, then ``pipeline/recipes``), and the
shipped DeepSpeed JSONs."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "pipeline" / "recipes"
DEEPSPEED_CONFIGS = ROOT / "deepspeed_configs"


def find_recipe(recipe: str | Path | None, search: Sequence[str | Path] = ()) -> Path | None:
    """A recipe path, or a name (``cpvt_b``, ``cpvt_b.yaml``) looked up in ``search`` (site recipe folders)
    first, then ``pipeline/recipes``; a name found nowhere is returned as given (load_yaml names it)."""
    if recipe is None:
        return None
    p = Path(recipe)
    if p.is_file():
        return p
    for folder in [*map(Path, search), RECIPES]:
        for candidate in (folder / p.name, folder / f"{p.name}.yaml"):
            if candidate.is_file():
                return candidate
    return p


def recipe_for_model(model: str | None, search: Sequence[str | Path] = (), site_file: Path | None = None
                     ) -> tuple[Path, str] | None:
    """The recipe ``--model X`` trains when no ``--recipe`` is given: ``X.yaml`` in the site's recipe folders
    (``search``, from ``site_file``), else the paper's ``pipeline/recipes/X.yaml``, with a note saying which; None
    when there is none (the model then only overrides ``model.name``)."""
    if not model:
        return None
    found = find_recipe(model, search)
    if found is None or not found.is_file():
        return None
    if found.parent == RECIPES:
        return found, f"the paper's recipe for --model {model}"
    return found, f"the site's recipe for --model {model} (site file {site_file} recipe_dirs)"
