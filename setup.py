"""Finds the packages, so none can be forgotten: everything under fastsr/, plus the top-level kernels/
and csrc/ folders shipped as fastsr.kernels and fastsr.csrc. Data-only folders (csrc/cpu, csrc/cuda,
models/weights) are namespace packages; their files are package data. Metadata is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

MAPPED = {"fastsr.kernels": "kernels", "fastsr.csrc": "csrc"}  # import name -> folder in the repository
EXCLUDE = ["*__pycache__*"]

packages = find_namespace_packages(include=["fastsr", "fastsr.*"], exclude=EXCLUDE)
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_namespace_packages(where=folder, exclude=EXCLUDE)]

setup(
    packages=packages,
    package_dir=MAPPED,
    package_data={"": ["*.cpp", "*.h", "*.cu", "*.safetensors"]},
)
