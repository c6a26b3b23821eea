"""pykernels: fused GPU kernels for sequence-model training (attention, LSTM, cross-entropy).

Drop-in use::

    import pykernels
    loss = pykernels.functional.cross_entropy(logits, target)      # as torch.nn.functional.cross_entropy
    criterion = pykernels.nn.CrossEntropyLoss()                     # as torch.nn.CrossEntropyLoss
    model = pykernels.patch(model)                                  # swaps supported torch.nn modules in place
    pykernels.patch_functional()                                    # routes torch.nn.functional's calls to ours
"""
from . import _ext
from . import ops  # noqa: F401  (registers the operators)
from . import functional, nn
from .backends import BackendUnavailableError, available_backends, checkpoint_context, last_dispatch, use_backend
from .patch import patch, patch_functional

__version__ = "0.1.0"

__all__ = ["functional", "nn", "patch", "patch_functional", "use_backend", "checkpoint_context", "available_backends",
           "last_dispatch", "BackendUnavailableError", "build_info", "__version__"]


def build_info() -> dict:
    """Metadata of the compiled extension (torch, CUDA, arches), and why it is unusable if it is; ``cpu_kernels``: the
    ISA its CPU kernels run at here ("AVX512" when the AVX-512 library is in use, else the build's), and
    ``cpu_kernels_note``: why the AVX-512 library is not in use, if it is not."""
    return {**_ext.build_info, "loaded": _ext.loaded(), "load_error": _ext.load_error,
            "cpu_kernels": _ext.cpu_kernels, "cpu_kernels_note": _ext.wide_error}
