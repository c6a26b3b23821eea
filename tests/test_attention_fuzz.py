"""Property-based fuzzing of the attention ops (hypothesis): random lengths (L != S, 1, block boundaries), head
dims, GQA groups, causal alignment, sliding windows, soft caps and masks, and random varlen batches (empty
sequences included), every backend against the float64 reference under the 2x-PyTorch-error rule with every
gradient, through the fixed-case tests' own checks. The block-skipping logic (which key blocks a query block
visits, which of them need masks, and the transpose for dK/dV) is where a wrong boundary hides: the interpreter
runs 16 x 16 tiles, so these lengths cross several blocks. Fixed example budgets keep CI time bounded; the GPU
tier runs longer examples (each new combination of options is a Triton compile there, so its budget is small
too); PYKERNELS_FUZZ_SCALE=k runs k times as many (a bug hunt)."""
from __future__ import annotations


import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from conftest import FUZZ_SCALE, HAS_CUDA, require_backend  # noqa: E402
import test_attention as ta  # noqa: E402  (not its names: pytest would collect its tests here again)

SEEDS = st.integers(0, 2**31 - 1)
WINDOW_SIDE = st.sampled_from([-1, 0, 1, 3, 17])  # -1: unbounded on that side


@st.composite
def visibility(draw):
    """Causal (either alignment) and sliding-window keyword arguments, or none."""
    kw = {}
    causal = draw(st.sampled_from([None, "top_left", "bottom_right"]))
    if causal:  # top-left is torch's is_causal: the oracle test then also runs torch's SDPA as the baseline
        kw.update(is_causal=True, **({"causal_alignment": causal} if causal == "bottom_right" else {}))
    left, right = draw(WINDOW_SIDE), draw(WINDOW_SIDE)
    if (left, right) != (-1, -1):
        kw["window"] = (left, right)
    return kw


@st.composite
def dense_cases(draw, max_len):
    """A case of test_attention.FN_CASES' form: (q shape, kv heads, S, Ev, kwargs, mask spec, id)."""
    B, Hk, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    H, L, S = Hk * group, draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    E, Ev = draw(st.sampled_from([16, 24, 40])), draw(st.sampled_from([16, 32]))
    kw = dict(draw(visibility()), **({"enable_gqa": True} if group > 1 else {}))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.sampled_from([1.5, 20.0]))
    if draw(st.booleans()):  # around the default 1/sqrt(E): far sharper softmaxes, see docs/attention.md "Not done"
        kw["scale"] = draw(st.sampled_from([0.5, 2.0])) / E ** 0.5
    mask = draw(st.sampled_from([None, "bool", "float"]))
    spec = None
    if mask:  # broadcast over batch and/or heads at random
        spec = f"{mask}:{draw(st.sampled_from([1, B]))},{draw(st.sampled_from([1, H]))},{L},{S}"
    return (B, H, L, E), Hk, S, Ev, kw, spec, f"fuzz {B=} {H=} {Hk=} {L=} {S=} {E=} {Ev=} {kw} {spec}"


@st.composite
def varlen_cases(draw, max_len):
    """Random per-sequence (query, key) lengths (zeros included), heads, head dims and options."""
    n = draw(st.integers(1, 4))
    # an empty batch (no query or no key at all) runs on the reference under any request, a hard one included
    # (test_dispatch_native.test_empty_call_under_a_hard_request_is_torchs): the fuzz keeps to the kernels
    lq = draw(st.lists(st.integers(0, max_len), min_size=n, max_size=n).filter(any))
    lk = draw(st.lists(st.integers(0, max_len), min_size=n, max_size=n).filter(any))
    Hk, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    kw = draw(visibility())
    if draw(st.booleans()):
        kw["softcap"] = 3.0
    return lq, lk, Hk * group, Hk, draw(st.sampled_from([16, 24])), draw(st.sampled_from([16, 32])), kw


def _offsets(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _varlen(backend, device, case):
    require_backend(backend, device)
    lq, lk, H, Hk, E, Ev, kw = case
    ta.check_varlen(backend, device, _offsets(lq, device), _offsets(lk, device), max(lq), max(lk), kw, H, Hk, E, Ev)


CPU_BACKENDS = [p for p in ta.BACKENDS if p.values[1] == "cpu" and p.values[0] != "reference"]
GPU_BACKENDS = [p for p in ta.BACKENDS if p.values[1] == "cuda"]


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@settings(max_examples=12 * FUZZ_SCALE, deadline=None, derandomize=False)
@given(case=dense_cases(max_len=40), seed=SEEDS)
def test_fuzz_sdpa(backend, device, case, seed):
    torch.manual_seed(seed)  # the data too is part of the example: a failure replays
    ta.test_sdpa_against_oracle(backend, device, case)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@settings(max_examples=8 * FUZZ_SCALE, deadline=None, derandomize=False)
@given(case=varlen_cases(max_len=30), seed=SEEDS)
def test_fuzz_varlen(backend, device, case, seed):
    torch.manual_seed(seed)
    _varlen(backend, device, case)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@settings(max_examples=10 * FUZZ_SCALE, deadline=None, derandomize=False)  # (each example compiles new kernels for
@given(case=dense_cases(max_len=300), seed=SEEDS)                          # two dtypes: the GPU tier's time is short)
def test_fuzz_sdpa_gpu(backend, device, case, seed):
    torch.manual_seed(seed)
    ta.test_sdpa_against_oracle(backend, device, case)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@settings(max_examples=8 * FUZZ_SCALE, deadline=None, derandomize=False)
@given(case=varlen_cases(max_len=300), seed=SEEDS)
def test_fuzz_varlen_gpu(backend, device, case, seed):
    torch.manual_seed(seed)
    _varlen(backend, device, case)
