"""Ships the embedded models inside the wheel (the rest of the build is pyproject.toml).

The models and their SCQ recipes stay where the repository keeps them (checkpoints/, recipes/); building
copies them into the package as mgtq/_embedded/, so `pip install <wheel>` then `mgtq generate` works from
any directory. mgtq.default_model looks there first, then in the repository (editable installs).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
EMBEDDED = {name: ROOT / "checkpoints" / name for name in ("tiny-shapes", "tiny-shapes-16x16")}
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))  # the shipped ones, taken by name (mgtq.default_model)


class BuildWithEmbeddedModel(build_py):
    def run(self):
        if not self.editable_mode:
            # setuptools never empties build/lib: a module or model file deleted from the sources since an earlier
            # build of this checkout would still go into the wheel
            shutil.rmtree(Path(self.build_lib) / "mgtq", ignore_errors=True)
        super().run()
        if self.editable_mode:  # an editable install reads the repository's own folders
            return
        target = Path(self.build_lib) / "mgtq" / "_embedded"
        for name, source in EMBEDDED.items():
            if not (source / "model_index.json").is_file():
                raise SystemExit(f"{source} is missing: the wheel would have no embedded default model")
            shutil.copytree(source, target / name, dirs_exist_ok=True)
        (target / "recipes").mkdir(parents=True, exist_ok=True)
        for recipe in RECIPES:
            shutil.copyfile(recipe, target / "recipes" / recipe.name)


setup(cmdclass={"build_py": BuildWithEmbeddedModel})
