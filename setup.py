"""Build script for lwam.

Packages: ``lwam`` and its subpackages, plus ``kernels/`` installed as ``lwam.kernels``.
The compiled extension ``lwam._C`` is added by ``_extensions()`` (see the latent-downsampling issue).
"""
from setuptools import find_packages, setup

packages = find_packages(include=["lwam", "lwam.*"]) + ["lwam.kernels"]

setup(
    packages=packages,
    package_dir={"lwam.kernels": "kernels"},
)
