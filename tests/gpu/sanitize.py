"""Driver for compute-sanitizer on the GPU machine: runs every CUDA/Triton kernel of an op family on small,
awkward shapes (odd sizes, D > 1, strided inputs, multi-block rows) so memcheck/racecheck/initcheck see every
code path. Usage: compute-sanitizer --tool memcheck python tests/gpu/sanitize.py [family ...]
Exits non-zero if a result is wrong (the sanitizer reports memory errors itself)."""
from __future__ import annotations

import os
import sys

import torch

import pykernels
from pykernels.reference import cross_entropy as ref_ce

# SANITIZE_DEVICE=cpu with TRITON_INTERPRET=1 runs the drivers' Triton paths on CPU (tests/test_sanitize_driver.py):
# a bug in the driver is then found in CI, not on a leased GPU.
DEV = os.environ.get("SANITIZE_DEVICE", "cuda")


# the Triton interpreter's bf16 tl.dot is wrong (../shared/TOOLCHAIN.md): on CPU the dot-based drivers skip bf16
HALF = (torch.bfloat16, torch.float16) if DEV == "cuda" else (torch.float16,)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def cross_entropy(backends):
    dev = DEV
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
                w = (torch.rand(C, device=dev) + 0.5).to(dtype)  # torch: the logits' dtype (class-index targets)
                for fused in (True, False):
                    xx = x.detach().clone().requires_grad_()
                    loss = pykernels.functional.cross_entropy(xx, t, weight=w, fused=fused, backend=backend, **kw)
                    loss.sum().backward()
                    ref, _ = ref_ce.cross_entropy(x.double().cpu(), t.cpu(), w.double().cpu(), **kw)  # torch's own GPU reductions trip racecheck
                    _sync()
                    err = (loss.double().cpu() - ref).abs().max().item()
                    assert err <= 1e-2 * max(1.0, ref.abs().max().item()), (backend, dtype, shape, kw, err)
                    assert torch.isfinite(xx.grad).all()
            p = torch.softmax(torch.randn(4, 1000, device=dev), 1).to(dtype)
            xx = torch.randn(4, 1000, device=dev, dtype=dtype, requires_grad=True)
            pykernels.functional.cross_entropy(xx, p, backend=backend).backward()
    _sync()
    print("cross_entropy: ok", backends)


def lstm_cell(backends):
    """The C++/CUDA and Triton LSTM cell kernels (forward and backward) on odd sizes, both dtypes of each."""
    from pykernels.reference import lstm as ref_lstm
    dev = DEV
    for backend in backends:
        for dtype in (torch.float32, *HALF):
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
                _sync()
                err = max((hy.double().cpu() - rh).abs().max().item(), (cy.double().cpu() - rc).abs().max().item())
                assert err <= (1e-4 if dtype == torch.float32 else 5e-2), (backend, dtype, B, I, H, err)
                assert all(torch.isfinite(t.grad).all() for t in (x, h, c, w_ih, w_hh))
    _sync()
    print("lstm_cell: ok", backends)


def lstm_layer(backends):
    """The sequence kernels (Triton: row-block for H <= 64, split over SMs with a grid barrier above, per-step
    launches under the interpreter; the persistent CUDA one with its grid barrier) forward and backward through
    nn.LSTM: both directions, two layers, odd sizes, T = 1 and a T that crosses many steps, against the float64
    reference."""
    from pykernels.reference import lstm as ref_lstm
    from pykernels.triton import lstm_layer as triton_layer
    dev = DEV
    for backend in [b for b in backends if b in ("triton", "cuda")]:
        for dtype in (torch.float32, *HALF):
            shapes = ((1, 1, 3, 5), (37, 19, 10, 33), (9, 3, 70, 130), (3, 5, 8, 601))  # 601: uneven last block
            if backend == "triton":  # H = 130 (70 on CPU) runs the split kernels, persistent on the GPU
                H = 130 if DEV != "cpu" else 70
                p = triton_layer.plan(H, dtype, torch.device(dev), True)
                assert p.split and p.persistent == (DEV != "cpu"), p
            for T, B, I, H in shapes if DEV != "cpu" else shapes[:1] + ((3, 3, 4, 70),):  # interpreter time
                m = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, device=dev, dtype=dtype)
                x = torch.randn(T, B, I, device=dev, dtype=dtype, requires_grad=True)
                params = [p.detach().requires_grad_() for p in m._flat_weights]
                out, (h, c) = pykernels.functional.lstm(x, None, params, 2, True, backend=backend)
                (out.float().sum() + h.float().sum() + c.float().sum()).backward()
                cpu = [p.detach().double().cpu() for p in params]
                ro, (rh, rc) = ref_lstm.lstm(x.detach().double().cpu(), None, cpu, 2, True)
                _sync()
                what = (backend, dtype, T, B, I, H)
                tol = 1e-4 if dtype == torch.float32 else 5e-2
                for name, a, r in (("out", out, ro), ("h_n", h, rh), ("c_n", c, rc)):
                    _close(a, r, tol, what + (name,))
                assert all(torch.isfinite(t.grad).all() for t in [x] + params), what
    _sync()
    print("lstm_layer: ok", [b for b in backends if b in ("triton", "cuda")])


def _close(got, ref, tol, what):
    got = got.detach().double().cpu()
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    assert err <= tol * max(1.0, ref.abs().max().item() if ref.numel() else 0.0), (what, err)


def attention(backends):
    """The Triton and CUDA attention kernels, forward and backward, on every masking path with lengths that are
    not multiples of the tiles: causal both alignments, window, softcap, GQA, bool/float masks (the float one with
    a gradient), dropout, head dims 16..256 and Ev != E, strided inputs, and varlen. The CUDA kernels run every case
    (head dim 256: the column-split backward; masks incl. the float mask's gradient; dropout)."""
    from pykernels.reference import attention as ref_attn
    dev = DEV
    cases = [  # (B, H, Hk, L, S, E, Ev, kwargs)
        (1, 2, 2, 1, 1, 16, 16, {}),
        (2, 3, 3, 17, 129, 64, 64, {"is_causal": True}),
        (1, 4, 2, 130, 67, 128, 128, {"is_causal": True, "causal_alignment": "bottom_right", "enable_gqa": True}),
        (2, 2, 2, 200, 200, 96, 64, {"window": (33, 5), "softcap": 20.0}),
        (1, 2, 1, 65, 257, 256, 256, {"enable_gqa": True}),
        (2, 2, 2, 31, 45, 32, 32, {"mask": "bool"}),
        (1, 3, 3, 70, 90, 64, 64, {"mask": "float"}),
    ]
    if dev == "cuda":  # > 256 visible keys: the Hopper TMA forward's 2-stage ring wraps (too slow interpreted)
        cases += [(1, 2, 2, 300, 300, 64, 64, {"is_causal": True}), (1, 2, 2, 390, 390, 128, 128, {})]
    else:  # the interpreter's time goes per program: 64-row tiles (its default, 16, is what the attention tests
        # run to cross block edges; here the driver's own code is under test)
        from pykernels.triton import attention as triton_attention
        triton_attention.TILE_OVERRIDE.update({kind: (64, 64, 4, 1) for kind in ("fwd", "dq", "dkdv")})
    for backend in [b for b in backends if b in ("triton", "cuda")]:
        for dtype in HALF:
            for B, H, Hk, L, S, E, Ev, kw in cases:
                kw = dict(kw)
                mask_kind = kw.pop("mask", None)
                q = torch.randn(B, L, H, E, device=dev, dtype=dtype).transpose(1, 2)  # strided: (B, H, L, E) view
                k = torch.randn(B, Hk, S, E, device=dev, dtype=dtype)
                v = torch.randn(B, Hk, S, Ev, device=dev, dtype=dtype)
                mask = None
                if mask_kind == "bool":
                    mask = torch.rand(B, 1, L, S, device=dev) > 0.3
                    mask[..., 0] = True
                elif mask_kind == "float":
                    mask = torch.randn(1, H, L, S, device=dev, dtype=dtype).requires_grad_()
                qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
                out = pykernels.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, backend=backend,
                                                                        **kw)
                g = torch.randn_like(out)
                out.backward(g)
                cpu = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
                cmask = None if mask is None else (mask.detach().cpu() if mask.dtype == torch.bool
                                                   else mask.detach().double().cpu().requires_grad_())
                window = kw.pop("window", None)
                align = kw.pop("causal_alignment", "top_left")
                ref, _ = ref_attn.scaled_dot_product_attention(*cpu, attn_mask=cmask, alignment=align,
                                                               window=window or (-1, -1), **kw)
                ref.backward(g.double().cpu())
                _sync()
                what = (backend, dtype, B, H, Hk, L, S, E, Ev, mask_kind)
                _close(out, ref.detach(), 2e-2, what + ("out",))
                for name, a, r in zip("qkv", (qq, kk, vv), cpu):
                    _close(a.grad, r.grad, 5e-2, what + ("d" + name,))
                if mask is not None and mask.requires_grad:
                    _close(mask.grad, cmask.grad, 5e-2, what + ("dmask",))
            # dropout (both backends: the same counter-based mask, regenerated by the backward)
            q, k, v = (torch.randn(2, 2, 77, 64, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            out = pykernels.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True,
                                                                    backend=backend)
            out.sum().backward()
            assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
            # varlen: three packed sequences of awkward lengths, causal
            lens = [5, 130, 67]
            cu = torch.tensor([0, 5, 135, 202], device=dev, dtype=torch.int32)
            q, k, v = (torch.randn(202, 4, 64, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            out = pykernels.functional.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), is_causal=True,
                                                        backend=backend)
            out.float().sum().backward()
            cpu = [t.detach().double().cpu() for t in (q, k, v)]
            ref, _ = ref_attn.varlen_attention(*cpu, cu.cpu(), cu.cpu(), is_causal=True)
            _sync()
            _close(out, ref, 2e-2, (backend, dtype, "varlen"))
            assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    _sync()
    print("attention: ok", [b for b in backends if b in ("triton", "cuda")])


def linear_cross_entropy(backends):
    """The Triton and CUDA linear cross-entropy kernels and the Triton fused path (fwd, d_input, d_weight, d_bias)
    on odd N/H/V, ignored rows, bias, class weights, label smoothing, z-loss, softcap; strided input rows in every
    other case (the CUDA kernels' scalar loads), 16-byte aligned rows in the others (their cp.async path)."""
    from pykernels.reference import linear_cross_entropy as ref_lce
    dev = DEV
    cases = [((1, 16, 3), {}), ((37, 65, 1001), {"linear_bias": True, "label_smoothing": 0.1}),
             ((130, 96, 5003), {"weight": True, "z_loss": 1e-3}), ((64, 128, 32769), {"softcap": 15.0}),
             ((33, 40, 257), {"reduction": "none", "ignore_index": 3})]
    if DEV == "cpu":  # the interpreter runs ~1e6 MAC/s: the same paths on shapes it finishes in seconds
        cases[1:4] = [((37, 65, 301), {"linear_bias": True, "label_smoothing": 0.1}),
                      ((30, 48, 503), {"weight": True, "z_loss": 1e-3}), ((9, 32, 1027), {"softcap": 15.0})]
    ran = [b for b in backends if b in ("triton", "cuda")]
    for backend, fused in [(b, None) for b in ran] + ([("triton", True)] if "triton" in ran else []):
        dtypes = HALF + ((torch.float32,) if backend == "triton" else ())
        for dtype in dtypes[-1:] if fused and DEV == "cpu" else dtypes:  # (CPU: the interpreter's time)
            for i, ((N, Hd, V), kw) in enumerate(cases):
                kw = dict(kw)
                x = torch.randn(N, Hd + 5, device=dev, dtype=dtype)[:, 2:Hd + 2]  # strided rows
                if i % 2:
                    x = x.contiguous()
                W = (torch.randn(V, Hd, device=dev) * Hd ** -0.5).to(dtype)
                b = (torch.randn(V, device=dev) * 0.1).to(dtype) if kw.pop("linear_bias", False) else None
                w = (torch.rand(V, device=dev) + 0.5).to(dtype) if kw.pop("weight", False) else None
                t = torch.randint(0, V, (N,), device=dev)
                t[1::5] = kw.get("ignore_index", -100)  # never every row: a mean over no rows is NaN
                leaves = [a.detach().clone().requires_grad_() for a in (x, W) + ((b,) if b is not None else ())]
                loss = pykernels.functional.linear_cross_entropy(
                    leaves[0], leaves[1], t, linear_bias=leaves[2] if b is not None else None, weight=w,
                    backend=backend, fused=fused, **kw)  # fused=True: the three-GEMM path (not for reduction none)
                loss.float().sum().backward()
                cpu = [a.detach().double().cpu() for a in (x, W)]
                ref, _ = ref_lce.linear_cross_entropy(*cpu, t.cpu(), None if b is None else b.double().cpu(),
                                                      None if w is None else w.double().cpu(), **kw)
                _sync()
                _close(loss, ref, 2e-2, (backend, dtype, N, Hd, V, kw))
                assert all(torch.isfinite(a.grad).all() for a in leaves)
    _sync()
    print("linear_cross_entropy: ok", ran)


def attention_mma_sync(backends):
    """The attention family again with PYKERNELS_ATTN_NO_SM90A=1: on Hopper the cuda backend then runs the mma.sync
    kernels (attention.cu) instead of the wgmma / TMA ones, so both paths are checked on one machine."""
    cuda = [b for b in backends if b == "cuda"]
    os.environ["PYKERNELS_ATTN_NO_SM90A"] = "1"
    try:
        if cuda:
            attention(cuda)
    finally:
        del os.environ["PYKERNELS_ATTN_NO_SM90A"]
    print("attention_mma_sync: ok", cuda)


FAMILIES = {"cross_entropy": cross_entropy, "lstm_cell": lstm_cell, "lstm_layer": lstm_layer, "attention": attention,
            "attention_mma_sync": attention_mma_sync, "linear_cross_entropy": linear_cross_entropy}

if __name__ == "__main__":
    names = sys.argv[1:] or list(FAMILIES)
    usable = [b for b in ("cuda", "triton") if pykernels.available_backends(DEV)[b] is None]
    print("usable:", usable, pykernels.available_backends(DEV))
    for n in names:
        FAMILIES[n](usable)
