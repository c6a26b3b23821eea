"""Driver for compute-sanitizer on the GPU machine: runs every CUDA/Triton kernel of an op family on small,
awkward shapes (odd sizes, D > 1, strided inputs, multi-block rows) so memcheck/racecheck/initcheck see every
code path. Usage: compute-sanitizer --tool memcheck python tests/gpu/sanitize.py [family ...]
Exits non-zero if a result is wrong (the sanitizer reports memory errors itself)."""
from __future__ import annotations

import sys

import torch

import pykernels
from pykernels.reference import cross_entropy as ref_ce


def cross_entropy(backends):
    dev = "cuda"
    cases = [((7, 33), {}), ((5, 4099), {"label_smoothing": 0.1, "z_loss": 1e-3}), ((3, 70001), {}),
             ((2, 9, 5), {"reduction": "none"}), ((2, 131072), {}), ((3, 50257), {"label_smoothing": 0.1}),
             ((2, 262144), {})]  # even C: contiguous rows (the sm_90 cluster path); odd C: strided rows
    for backend in backends:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for shape, kw in cases:
                C = shape[1]
                x = torch.randn(shape, device=dev, dtype=dtype)
                if len(shape) == 2 and C % 2:
                    x = torch.randn(shape[0], C + 3, device=dev, dtype=dtype)[:, 1:C + 1]  # strided rows
                t = torch.randint(0, C, shape[:1] + shape[2:], device=dev)
                t.view(-1)[::3] = -100
                w = torch.rand(C, device=dev) + 0.5
                for fused in (True, False):
                    xx = x.detach().clone().requires_grad_()
                    loss = pykernels.functional.cross_entropy(xx, t, weight=w, fused=fused, backend=backend, **kw)
                    loss.sum().backward()
                    ref, _ = ref_ce.cross_entropy(x.double().cpu(), t.cpu(), w.double().cpu(), **kw)  # torch's own GPU reductions trip racecheck
                    torch.cuda.synchronize()
                    err = (loss.double().cpu() - ref).abs().max().item()
                    assert err <= 1e-2 * max(1.0, ref.abs().max().item()), (backend, dtype, shape, kw, err)
                    assert torch.isfinite(xx.grad).all()
            p = torch.softmax(torch.randn(4, 1000, device=dev), 1).to(dtype)
            xx = torch.randn(4, 1000, device=dev, dtype=dtype, requires_grad=True)
            pykernels.functional.cross_entropy(xx, p, backend=backend).backward()
    torch.cuda.synchronize()
    print("cross_entropy: ok", backends)


def lstm_cell(backends):
    """The C++/CUDA and Triton LSTM cell kernels (forward and backward) on odd sizes, both dtypes of each."""
    from pykernels.reference import lstm as ref_lstm
    dev = "cuda"
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16):
            for B, I, H, bias in ((1, 3, 5, True), (19, 10, 33, False), (7, 130, 67, True)):
                x = torch.randn(B, I, device=dev, dtype=dtype, requires_grad=True)
                h = torch.randn(B, H, device=dev, dtype=dtype, requires_grad=True)
                c = torch.randn(B, H, device=dev, dtype=dtype, requires_grad=True)
                w_ih = (torch.randn(4 * H, I, device=dev) * 0.2).to(dtype).requires_grad_()
                w_hh = (torch.randn(4 * H, H, device=dev) * 0.2).to(dtype).requires_grad_()
                bs = [(torch.randn(4 * H, device=dev) * 0.1).to(dtype).requires_grad_() for _ in range(2)] \
                    if bias else [None, None]
                hy, cy = pykernels.functional.lstm_cell(x, (h, c), w_ih, w_hh, *bs, backend=backend)
                (hy.float().sum() + cy.float().sum()).backward()
                cpu = [t.detach().double().cpu() if t is not None else None for t in (x, h, c, w_ih, w_hh, *bs)]
                rh, rc = ref_lstm.lstm_cell(*cpu)
                torch.cuda.synchronize()
                err = max((hy.double().cpu() - rh).abs().max().item(), (cy.double().cpu() - rc).abs().max().item())
                assert err <= (1e-4 if dtype == torch.float32 else 5e-2), (backend, dtype, B, I, H, err)
                assert all(torch.isfinite(t.grad).all() for t in (x, h, c, w_ih, w_hh))
    torch.cuda.synchronize()
    print("lstm_cell: ok", backends)


FAMILIES = {"cross_entropy": cross_entropy, "lstm_cell": lstm_cell}

if __name__ == "__main__":
    names = sys.argv[1:] or list(FAMILIES)
    usable = [b for b in ("cuda", "triton") if pykernels.available_backends("cuda")[b] is None]
    print("usable:", usable, pykernels.available_backends("cuda"))
    for n in names:
        FAMILIES[n](usable)
