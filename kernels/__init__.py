"""Triton kernels of lwam, installed as ``lwam.kernels``. Importing this package does not import Triton;
each kernel module does, and the ops in ``lwam.ops`` fall back to references when it is missing."""
