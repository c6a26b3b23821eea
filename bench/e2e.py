"""End-to-end suite: whole training runs of the models of bench/models.py (character-level LSTM, small
GPT-style decoder, and Hugging Face's GPT-2 when Transformers is installed), torch modules against the same model
after ``pykernels.patch`` and with ``pykernels.patch_functional`` on while it runs.

A provider is a model transform: ``torch`` leaves the model as built, ``pykernels-<backend>`` patches it and routes
torch.nn.functional's calls of its forward to pykernels (``auto``: the dispatch a user gets). Every provider trains
a freshly seeded model on the same batches of the built-in text for ``steps`` steps; its loss curve must stay
within the dtype's tolerance of the torch curve (else ``wrong``, not timed). Then one training step (forward, backward, Adam) is timed on the same model as it
keeps training: the step time (median), tokens/s = batch * seq / step time, and on CUDA the peak memory of a
step beyond the weights and optimizer state.

Precision: fp32 trains in fp32; bf16/fp16 keep fp32 weights and run the step under ``torch.autocast`` (fp16
with a GradScaler), the usual mixed-precision recipe. No FLOP model: the suite reports tokens/s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Callable, Dict, List, Optional

import torch

from . import models
from .harness import Case, Provider, WrongOutput, check_shape_values

NAME = "e2e"
MODES = ("train",)
SEED = 0
LR = 1e-3
# Largest |loss - torch's loss| / max(1, torch's loss) over the curve: about 2.5 units in the last place of the
# dtype under autocast (bf16 7.8e-3, fp16 9.8e-4), whose rounding of every matmul the optimizer compounds over
# the steps; fp32 runs differ by summation order only. On CPU (10 steps) the curves agreed to 1e-7 in fp32 and
# 6e-5 under bf16 autocast.
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 2.5e-3}


@dataclasses.dataclass(frozen=True)
class Workload:
    model: str  # "char-lstm" | "gpt" | "hf-gpt2"
    cfg: object
    batch: int
    seq: int
    steps: int


def _lstm(embed, hidden, layers, batch, seq, steps):
    return Workload("char-lstm", models.CharLSTMConfig(embed, hidden, layers), batch, seq, steps)


def _gpt(embed, heads, layers, batch, seq, steps):
    return Workload("gpt", models.GPTConfig(seq, embed, heads, layers), batch, seq, steps)


def _hf(embed, heads, layers, batch, seq, steps):
    return Workload("hf-gpt2", models.HFGPT2Config(seq, embed, heads, layers), batch, seq, steps)


PRESETS = {  # (device type, quick) -> workloads
    ("cuda", False): [_lstm(256, 1024, 2, 32, 256, 20), _gpt(768, 12, 12, 8, 1024, 20),  # GPT-2 small minus vocab
                      _hf(768, 12, 12, 8, 1024, 20)],  # GPT-2 small
    ("cuda", True): [_lstm(256, 512, 2, 32, 128, 10), _gpt(512, 8, 4, 8, 512, 10), _hf(512, 8, 4, 8, 512, 10)],
    ("cpu", False): [_lstm(64, 256, 2, 16, 64, 10), _gpt(128, 4, 2, 8, 128, 10), _hf(128, 4, 2, 4, 128, 10)],
    ("cpu", True): [_lstm(32, 64, 2, 8, 32, 5), _gpt(64, 4, 2, 4, 64, 5), _hf(64, 4, 2, 2, 64, 5)],
}
BUILD = {"char-lstm": models.CharLSTM, "gpt": models.GPT, "hf-gpt2": models.HFGPT2}


class PatchedCalls(torch.nn.Module):
    """``model`` with ``pykernels.patch_functional`` on while its forward runs (the backward looks no name up):
    the process-wide patch stays inside this provider's steps, never in the baseline's."""

    def __init__(self, model: torch.nn.Module, backend: Optional[str] = None):
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, *args):
        import pykernels
        with pykernels.patch_functional(backend=self.backend):
            return self.model(*args)


class TrainingCase(Case):
    suite = NAME

    def __init__(self, w: Workload, dtype: torch.dtype, device: torch.device):
        if dtype not in TOL:
            raise ValueError(f"e2e: dtype must be one of {[str(d) for d in TOL]}, got {dtype}")
        self.w, self.dtype, self.device, self.tol = w, dtype, device, TOL[dtype]
        dims = {k: v for k, v in dataclasses.asdict(w.cfg).items() if k != "seq"}
        self.shape = {"B": w.batch, "T": w.seq, "steps": w.steps, **dims}
        self.name = f"{w.model} " + " ".join(f"{k}={v}" for k, v in self.shape.items())

    def inputs(self):
        """The batches of the checked steps, made once on the device for every provider (no host work or copy
        inside a timed step); each provider builds its own model from the seed. Nothing gets a gradient."""
        it = models.batches(models.corpus(), self.w.batch, self.w.seq, SEED, self.device)
        return (list(itertools.islice(it, self.w.steps)),), ()

    def trainer(self, transform: Callable[[torch.nn.Module], torch.nn.Module], batches: List[tuple]
                ) -> Callable[[], torch.Tensor]:
        """A fresh seeded model, its Adam optimizer (made before ``transform``, as a user who patches a model
        they already set up) and the step closure: one batch, forward, backward, optimizer step."""
        torch.manual_seed(SEED)
        model = BUILD[self.w.model](self.w.cfg).to(self.device)
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        model = transform(model)
        data = itertools.cycle(batches)  # the checked steps, then the same batches again while timed
        mixed = self.dtype != torch.float32
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

        def step():
            x, t = next(data)
            with torch.autocast(self.device.type, self.dtype) if mixed else contextlib.nullcontext():
                loss = model(x, t)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    def curve(self, step: Callable[[], torch.Tensor]) -> List[float]:
        return [float(step()) for _ in range(self.w.steps)]

    def reference(self, args):
        return self.curve(self.trainer(lambda m: m, *args))

    def prepare(self, prov: Provider, mode, args0, diff, ref):
        step = self.trainer(prov.fn, *args0)
        losses = self.curve(step)
        abs_err = max(abs(a - b) for a, b in zip(losses, ref))
        rel = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses, ref))
        if not rel <= self.tol:  # NaN fails too
            worst = max(range(len(ref)), key=lambda i: abs(losses[i] - ref[i]))
            raise WrongOutput(f"loss curve off by {rel:.3e} (relative) at step {worst}: {losses[worst]:.5f} vs "
                              f"torch's {ref[worst]:.5f}; tolerance {self.tol:g}", abs_err, rel)
        return step, [], (abs_err, rel)

    def tokens(self, mode):
        return float(self.w.batch * self.w.seq)


def cases(device: torch.device, dtype: torch.dtype, quick: bool,
          shape: Optional[Dict[str, int]] = None) -> List[Case]:
    """--shape overrides, in every preset workload, the fields it names: B, T, steps or a model dimension (a
    dimension only the LSTM has, e.g. hidden, leaves the GPT as it is)."""
    workloads = PRESETS[(device.type, quick)]
    if shape:
        known = {"B", "T", "steps"} | {f.name for w in workloads for f in dataclasses.fields(w.cfg)} - {"seq"}
        if set(shape) - known:
            raise ValueError(f"e2e: --shape keys must be among {sorted(known)}, got {sorted(set(shape) - known)}")
        check_shape_values(shape, sizes=sorted(known))  # every key is a size (steps=0 left an empty loss curve)
        workloads = [_override(w, shape) for w in workloads]
    return [TrainingCase(w, dtype, device) for w in workloads]


def _override(w: Workload, shape: Dict[str, int]) -> Workload:
    fields = {f.name for f in dataclasses.fields(w.cfg)}
    cfg = dataclasses.replace(w.cfg, **{k: v for k, v in shape.items() if k in fields})
    seq = shape.get("T", w.seq)
    if "seq" in fields:  # the GPT's position table covers the sequence length
        cfg = dataclasses.replace(cfg, seq=seq)
    return Workload(w.model, cfg, shape.get("B", w.batch), seq, shape.get("steps", w.steps))


def providers(device: torch.device, dtype: torch.dtype) -> List[Provider]:
    """torch (the baseline), pykernels-auto (patch and patch_functional with automatic dispatch) and, on CUDA,
    pykernels-triton (every swapped module and routed call preferring the Triton kernels, where automatic dispatch
    may pick SDPA/cuDNN)."""
    out = [Provider("torch", lambda m: m, baseline=True)]
    try:
        import pykernels
    except Exception as e:
        return out + [Provider("pykernels-auto", None, f"import failed: {type(e).__name__}: {e}")]
    out.append(Provider("pykernels-auto", lambda m: PatchedCalls(pykernels.patch(m))))
    triton = Provider("pykernels-triton", lambda m: PatchedCalls(pykernels.patch(m, backend="triton"), "triton"),
                      default=device.type == "cuda")
    if device.type != "cuda":
        triton.fn, triton.absent = None, "the Triton kernels run on CUDA (on CPU only under the interpreter)"
    out.append(triton)
    return out
