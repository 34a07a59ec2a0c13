"""Package list for setuptools (the rest of the metadata is in pyproject.toml).

The C++ sources live in the top-level ``csrc/`` folder and ship as package data of
``heal_kernels.csrc``, where :func:`heal_kernels.cpu.csrc_dir` finds them in an installed wheel.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["heal", "heal.*", "heal_kernels", "heal_kernels.*"]) + ["heal_kernels.csrc"],
    package_dir={"heal_kernels.csrc": "csrc"},
)
