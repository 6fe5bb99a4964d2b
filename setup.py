"""Package list: everything under src/ plus the top-level kernels/ folder installed as specdec.kernels."""

from setuptools import find_packages, setup

kernels = ["specdec.kernels", *(f"specdec.kernels.{name}" for name in find_packages("kernels"))]
setup(packages=[*find_packages("src"), *kernels])
