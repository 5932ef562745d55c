"""Kernel tests: without a GPU, the Triton kernels run in the Triton interpreter on CPU tensors.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when its module is first
imported, so it is set here, before pytest imports any test module of this directory (and so before any
of them imports ``wmtp_kernels``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
