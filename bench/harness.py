"""Providers, cases and the correctness-then-timing loop every suite shares.

Rules (../shared/DESIGN.md "Performance policy"): fresh random inputs (never zeros); every provider's output is
checked against a float32 reference on the very inputs it is timed on, before it is timed (a wrong provider is
reported ``wrong`` and not timed, one that raises is reported ``error``); every provider gets its own copy of
the inputs (some kernels, e.g. Liger's, write the gradient into the logits in place); ratios side by side.

A suite is a module with ``NAME``, ``MODES``, ``providers(device, dtype) -> [Provider]`` and
``cases(device, dtype, quick, shape=None) -> [Case]``; see bench/cross_entropy.py, and bench/providers.py for
the pieces suites share. A case whose unit of work is not "call the provider on the inputs" (bench/e2e.py: a
provider transforms a model, the step is a training step, the check is the loss curve) overrides
``Case.prepare``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .timing import matmul_roof, peak_extra_memory, time_interleaved, time_ms, time_ms_graph

# modes whose step runs the backward; "fwd" runs under torch.no_grad(); "bwd" times the backward alone: the
# forward runs once, untimed, and each timed step goes back through its retained graph (as FlashAttention's and
# Triton's attention benchmarks time it)
BACKWARD_MODES = ("fwd+bwd", "bwd")


@dataclasses.dataclass
class Provider:
    name: str
    fn: Optional[Callable[..., Any]] = None
    absent: Optional[str] = None  # why it cannot run here (not installed, wrong device): listed, not timed
    baseline: bool = False  # speed-ups of every provider are reported against each baseline
    default: bool = True  # run without being named (False: e.g. a backend that targets another device)


class Case:
    """One benchmark input configuration of a suite. Subclasses fill in the inputs, the fp32 reference and the
    byte/FLOP model; the harness does the rest."""
    suite: str = ""
    name: str = ""
    shape: Dict[str, int] = {}
    dtype: torch.dtype = torch.float32
    tol: float = 1e-4  # on the error normalised by the reference's magnitude (see errors())

    def inputs(self) -> Tuple[tuple, Sequence[int]]:
        """Fresh random arguments and the indices of those that get a gradient in the backward modes."""
        raise NotImplementedError

    def reference(self, args: tuple) -> Any:
        """The expected outputs (and input gradients), computed in float32 once per case."""
        raise NotImplementedError

    def errors(self, ref: Any, out: Any, grads: List[Optional[torch.Tensor]], mode: str) -> Tuple[float, float]:
        """(max absolute error, error normalised by the reference's scale) of one provider's outputs."""
        raise NotImplementedError

    def bytes(self, mode: str) -> Optional[float]:
        return None

    def flops(self, mode: str) -> Optional[float]:
        return None

    def model_extra_mem(self, provider: str, mode: str) -> Optional[int]:
        """Extra bytes (beyond the inputs) a provider's design says one step allocates at its peak, reported beside
        the measured peak; None where the suite has no model of that provider."""
        return None

    def tokens(self, mode: str) -> Optional[float]:
        """Tokens one timed step processes (training suites): the harness reports tokens/s from it."""
        return None

    # launch-bound (a step of microseconds, e.g. one LSTM cell): on CUDA also timed replayed from a CUDA graph
    launch_bound: bool = False

    def backward(self, out: Any, retain_graph: bool = False) -> None:
        out.backward(retain_graph=retain_graph)  # the loss suites return a scalar; tensor outputs override this

    def prepare(self, prov: "Provider", mode: str, args0: tuple, diff: Sequence[int], ref: Any):
        """Check ``prov`` and return (step, leaves, (max_abs_err, rel_err)); raise WrongOutput if it is wrong.
        ``step`` is what gets timed, ``leaves`` the tensors whose .grad is reset between timed calls."""
        return prepare(self, prov, mode, args0, diff, ref)


@dataclasses.dataclass
class Result:
    suite: str
    case: str
    provider: str
    mode: str
    dtype: str
    shape: Dict[str, int]
    status: str = "ok"  # ok | wrong | error | absent
    ms_p50: Optional[float] = None
    ms_p20: Optional[float] = None
    ms_p80: Optional[float] = None
    ms_iqr: Optional[float] = None  # CPU (torch.utils.benchmark) only
    samples_ms: List[float] = dataclasses.field(default_factory=list)  # what the quantiles are of (timing.Timing)
    graph_ms_p50: Optional[float] = None  # launch-bound cases on CUDA: the step replayed from a CUDA graph
    graph_ms_p20: Optional[float] = None
    graph_ms_p80: Optional[float] = None
    graph_error: Optional[str] = None  # why the step could not be captured
    bytes: Optional[float] = None
    flops: Optional[float] = None
    gbps: Optional[float] = None
    pct_of_copy_bw: Optional[float] = None
    tflops: Optional[float] = None
    pct_of_matmul: Optional[float] = None
    tokens: Optional[float] = None  # per timed step (training suites)
    tokens_per_s: Optional[float] = None
    peak_extra_mem_bytes: Optional[int] = None
    model_extra_mem_bytes: Optional[int] = None  # what the suite's memory model predicts for it (where one exists)
    max_abs_err: Optional[float] = None
    rel_err: Optional[float] = None
    error: Optional[str] = None
    speedup_vs: Dict[str, float] = dataclasses.field(default_factory=dict)


class WrongOutput(Exception):
    """The provider's output missed the reference; the errors ride along so that its Result records them."""

    def __init__(self, message: str, max_abs_err: Optional[float] = None, rel_err: Optional[float] = None):
        super().__init__(message)
        self.max_abs_err, self.rel_err = max_abs_err, rel_err


@dataclasses.dataclass
class ReferenceFailed:
    """Stands for the reference of a case that could not be computed here (e.g. the e2e suite's torch run of
    an LSTM under CPU fp16 autocast, which oneDNN rejects): every provider of the case is reported ``error``."""
    message: str


def check_shape_values(shape: Dict[str, int], sizes: Sequence[str] = (), flags: Sequence[str] = ()) -> None:
    """ValueError unless those of ``sizes`` in ``shape`` are positive and those of ``flags`` 0 or 1: the value
    check of --shape, for bench/__main__'s SHAPE_KEYS and the suites that check their own keys (attention, e2e)."""
    bad = [f"{k}={shape[k]}" for k in sizes if k in shape and shape[k] <= 0]
    if bad:
        raise ValueError(f"sizes must be positive, got {', '.join(bad)}")
    bad = [f"{k}={shape[k]}" for k in flags if k in shape and shape[k] not in (0, 1)]
    if bad:
        raise ValueError(f"flags must be 0 or 1, got {', '.join(bad)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def prepare(case: Case, prov: Provider, mode: str, args0: tuple, diff: Sequence[int], ref: Any):
    """Check one provider on its own copy of the inputs; return (step, leaves, (max_abs_err, rel_err)).

    Raises WrongOutput when the output misses the reference by more than case.tol; any exception the provider
    raises propagates. ``step`` is what gets timed: one forward (+ backward) call, or in mode "bwd" one backward
    through the graph of a forward run here, once."""
    bwd = mode in BACKWARD_MODES
    args = tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args0)
    leaves = [args[i].requires_grad_() for i in diff] if bwd else []

    if mode == "bwd":
        with torch.enable_grad():
            fwd_out = prov.fn(*args)

        def step():
            case.backward(fwd_out, retain_graph=True)
            return fwd_out
    else:
        def step():
            with contextlib.nullcontext() if bwd else torch.no_grad():
                out = prov.fn(*args)
                if bwd:
                    case.backward(out)
            return out

    out = step()
    errs = case.errors(ref, out, [t.grad for t in leaves], mode)
    if not errs[1] <= case.tol:  # NaN fails too
        raise WrongOutput(f"error {errs[1]:.3e} (normalised; max abs {errs[0]:.3e}) vs the fp32 reference, "
                          f"tolerance {case.tol:g}", *errs)
    return step, leaves, errs


def _failed(r: "Result", e: Exception) -> None:
    r.status, r.error = "error", f"{type(e).__name__}: {e}"[:500]


def _checked(case: Case, prov: Provider, mode: str, args0, diff, ref) -> Tuple["Result", Any, list]:
    """The provider's result with its status and errors, and (step, leaves) to time where it is ok."""
    r = Result(case.suite, case.name, prov.name, mode, dtype_name(case.dtype), dict(case.shape),
               bytes=case.bytes(mode), flops=case.flops(mode), tokens=case.tokens(mode),
               model_extra_mem_bytes=case.model_extra_mem(prov.name, mode))
    if prov.absent or prov.fn is None:
        r.status, r.error = "absent", prov.absent or "no callable"
        return r, None, []
    if isinstance(ref, ReferenceFailed):
        r.status, r.error = "error", ref.message
        return r, None, []
    try:
        step, leaves, (r.max_abs_err, r.rel_err) = case.prepare(prov, mode, args0, diff, ref)
        return r, step, leaves
    except WrongOutput as e:
        r.status, r.error = "wrong", str(e)
        # NaN/inf stay in the error text: the JSON keeps null there, as NaN is not valid JSON
        r.max_abs_err, r.rel_err = (float(v) if v is not None and math.isfinite(v) else None
                                    for v in (e.max_abs_err, e.rel_err))
    except Exception as e:  # a provider that cannot run this case is reported, not fatal
        _failed(r, e)
    return r, None, []


def measure(case: Case, prov: Provider, mode: str, args0, diff, ref, device: torch.device,
            quick: bool) -> Result:
    r, step, leaves = _checked(case, prov, mode, args0, diff, ref)
    if step is None:
        return r
    try:
        r.ms_p50, r.ms_p20, r.ms_p80, r.ms_iqr, r.samples_ms = time_ms(step, device, grad_to_none=leaves or None,
                                                                       quick=quick)
        if case.launch_bound and device.type == "cuda":
            try:
                r.graph_ms_p50, r.graph_ms_p20, r.graph_ms_p80 = time_ms_graph(step, device, leaves or None)
            except Exception as e:  # not capturable: say why, keep the eager timing
                r.graph_error = f"{type(e).__name__}: {e}"[:300]
        for t in leaves:
            t.grad = None
        r.peak_extra_mem_bytes = peak_extra_memory(step, device)
    except Exception as e:
        _failed(r, e)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def measure_interleaved(case: Case, providers: List[Provider], mode: str, args0, diff, ref,
                        quick: bool) -> List[Result]:
    """CPU: every provider checked first, then the ok ones timed interleaved (timing.time_interleaved)."""
    staged = [_checked(case, prov, mode, args0, diff, ref) for prov in providers]
    live = [(r, step, leaves) for r, step, leaves in staged if step is not None]
    if live:
        try:
            stats = time_interleaved([s for _, s, _ in live], [leaves for _, _, leaves in live], quick=quick)
        except Exception:  # one failing provider fails the round: time them one by one instead
            stats = []
            for r, step, leaves in live:
                try:
                    stats.append(time_ms(step, torch.device("cpu"), grad_to_none=leaves or None, quick=quick))
                except Exception as e:
                    _failed(r, e)
                    stats.append((None, None, None, None, []))
        for (r, _, leaves), st in zip(live, stats):
            r.ms_p50, r.ms_p20, r.ms_p80, r.ms_iqr, r.samples_ms = st
            for t in leaves:
                t.grad = None
    return [r for r, _, _ in staged]


def run_suite(suite, device: torch.device, dtype: torch.dtype, quick: bool, providers: List[Provider],
              cases: List[Case], modes: Sequence[str], progress=None) -> List[Result]:
    """Every case, mode and provider. On CUDA each provider is checked and timed in turn (and its memory freed
    before the next); on CPU each mode's providers are checked, then timed interleaved."""
    results = []
    for case in cases:
        try:
            args0, diff = case.inputs()
            ref = case.reference(args0)
        except Exception as e:  # reported on every provider of the case; the other cases still run
            args0, diff, ref = (), (), ReferenceFailed(f"reference failed: {type(e).__name__}: {e}"[:500])
        for mode in modes:
            if device.type == "cpu":
                if progress is not None:
                    progress.describe(f"{suite.NAME} {case.name} {mode}")
                results.extend(measure_interleaved(case, providers, mode, args0, diff, ref, quick))
                if progress is not None:
                    progress.advance(len(providers))
                continue
            for prov in providers:
                if progress is not None:
                    progress.describe(f"{suite.NAME} {case.name} {mode} {prov.name}")
                results.append(measure(case, prov, mode, args0, diff, ref, device, quick))
                if progress is not None:
                    progress.advance()
        del args0, ref
    return results


def derive(results: List[Result], ceilings: dict) -> None:
    """GB/s, TFLOP/s and tokens/s from each case's byte/FLOP/token counts, % of the measured ceilings (the matmul
    roof of the result's dtype, timing.matmul_roof; none where that dtype's rate was not measured)."""
    for r in results:
        if not r.ms_p50:
            continue
        if r.tokens:
            r.tokens_per_s = r.tokens / r.ms_p50 * 1e3
        if r.bytes:
            r.gbps = r.bytes / r.ms_p50 / 1e6
            if ceilings.get("copy_gbps"):
                r.pct_of_copy_bw = 100 * r.gbps / ceilings["copy_gbps"]
        if r.flops:
            r.tflops = r.flops / r.ms_p50 / 1e9
            ceiling = matmul_roof(r.dtype, ceilings)  # the best matmul rate for the result's dtype
            if ceiling:
                r.pct_of_matmul = 100 * r.tflops / ceiling


def add_speedups(results: List[Result], baselines: Sequence[str]) -> None:
    groups: Dict[tuple, Dict[str, Result]] = {}
    for r in results:
        groups.setdefault((r.suite, r.case, r.mode, r.dtype), {})[r.provider] = r
    for group in groups.values():
        for r in group.values():
            for b in baselines:
                base = group.get(b)
                if b != r.provider and r.ms_p50 and base is not None and base.ms_p50:
                    r.speedup_vs[b] = base.ms_p50 / r.ms_p50
