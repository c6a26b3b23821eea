"""Which backend a call takes when the caller states a preference: use_backend blocks (the innermost wins, and
outranks PYKERNELS_BACKEND), the PYKERNELS_BACKEND and PYKERNELS_PREFER_NATIVE variables (an empty one is unset, a
misspelt one fails naming the variable), and available_backends on a machine without a GPU."""
from __future__ import annotations

import pytest
import torch

import pykernels
from pykernels import backends
from pykernels.errors import ArgumentValueError


def test_use_backend_block_outranks_the_environment_variable(monkeypatch):
    """The innermost use_backend block is the preference in force; PYKERNELS_BACKEND only where no block names
    one (use_backend(None) included: automatic, i.e. the variable)."""
    x, t = torch.randn(3, 4), torch.randint(0, 4, (3,))
    monkeypatch.setenv("PYKERNELS_BACKEND", "cpu")
    with pykernels.use_backend("reference"):
        pykernels.functional.cross_entropy(x, t)
    assert pykernels.last_dispatch["cross_entropy"] == ("reference", {})
    with pykernels.use_backend("cpu"), pykernels.use_backend("reference"):  # nested: the innermost block
        pykernels.functional.cross_entropy(x, t)
    assert pykernels.last_dispatch["cross_entropy"] == ("reference", {})
    if pykernels.available_backends("cpu")["cpu"] is None:  # the C++ kernel is built
        monkeypatch.setenv("PYKERNELS_BACKEND", "reference")
        with pykernels.use_backend("cpu"):
            pykernels.functional.cross_entropy(x, t)
        assert pykernels.last_dispatch["cross_entropy"] == ("cpu", {})


def test_empty_or_misspelt_backend_variable(monkeypatch):
    """PYKERNELS_BACKEND='' is unset (automatic); a misspelt one fails naming the variable, never runs anywhere."""
    x, t = torch.randn(3, 4), torch.randint(0, 4, (3,))
    monkeypatch.setenv("PYKERNELS_PREFER_NATIVE", "0")
    monkeypatch.setenv("PYKERNELS_BACKEND", "")
    pykernels.functional.cross_entropy(x, t)
    assert pykernels.last_dispatch["cross_entropy"][0] == backends._chain(x.device, "cross_entropy")[0]
    monkeypatch.setenv("PYKERNELS_BACKEND", "tritn")
    with pytest.raises(ArgumentValueError, match="PYKERNELS_BACKEND"):
        pykernels.functional.cross_entropy(x, t)


def test_available_backends_for_cuda_without_a_gpu(monkeypatch):
    """Without a CUDA device, available_backends('cuda') names that for every kernel backend, not a per-backend
    reason that needs a device to compute (get_device_capability)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    got = pykernels.available_backends("cuda")
    assert got["reference"] is None
    assert all("no CUDA device here" in got[b] for b in ("triton", "cuda", "cpu")), got


def test_prefer_native_switch_ignores_surrounding_space(monkeypatch):
    """PYKERNELS_PREFER_NATIVE=" Off " is the documented "off" (any case, surrounding space ignored)."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.setenv("PYKERNELS_PREFER_NATIVE", " Off ")
    assert backends.prefer_native("lstm", torch.device("cuda"), None) is None
