"""`python -m prad.kernels`: build (or find) the native library now, so no request waits for it."""

import logging

from prad import kernels

logging.basicConfig(level=logging.INFO, format="%(message)s")
cc = kernels.compiler()
if kernels.library() is None or cc is None:
    print("native kernels: not available, the decode step runs on PyTorch ops only")
else:
    print(f"native kernels: {kernels.library_file(cc)}")
