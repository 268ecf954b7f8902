"""Gather / projection / occlusion kernels.

Each op lives in its own module with three parts: the private Triton kernel,
its public launcher, and the torch implementation that is both the CPU
backend and the reference the tests compare the kernel with.
"""
