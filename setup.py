"""The one packaging rule pyproject.toml cannot state: the top-level folders kernels/ and experiments/ install
as the subpackages llmjax.kernels and llmjax.experiments (with their own subpackages, found here), so the
distribution claims no top-level import name but `llmjax`. tools/, tests/ and docs/ are not installed.
Everything else (metadata, dependencies, the llmjax-experiments command) is in pyproject.toml.
"""

from setuptools import find_packages, setup

NESTED = {"llmjax.kernels": "kernels", "llmjax.experiments": "experiments"}  # package -> folder

packages = find_packages(include=["llmjax", "llmjax.*"])
for package, folder in NESTED.items():
    packages += [package] + [f"{package}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=NESTED,
      package_data={"llmjax.kernels": ["*.json", "**/*.json", "cpu/*.cc"]})  # tuned tile tables; C++ sources
