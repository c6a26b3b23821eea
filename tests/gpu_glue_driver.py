"""Drives every Triton launcher of pykernels down its GPU branch on a machine without a GPU (run by
tests/test_triton_compile.py in a subprocess): no TRITON_INTERPRET (real JITFunctions and the GPU autotuners), fake
CUDA tensors (FakeTensorMode), CUDA device queries faked as an H100, JITFunction.run replaced by a checker (binding of
every argument, options, the grid evaluated with the meta the GPU run would have, CUDA's grid limits). Mode "eager":
wrap_triton disabled (what a triton_op does in eager); mode "compile": enabled, so each launch goes through torch's
HOPifier as under torch.compile (it refused a Config pre_hook there, which the interpreter's kernels never meet).
Usage: python3 tests/gpu_glue_driver.py [eager|compile] [autotune]; prints "launches checked: N; problems: M" last,
after one line per case ("ok", "PROBLEMS" or "RAISED ..."). Debugging aids (no test uses them): DUMP=1 also prints
each distinct launch (grid, options, constexprs); RECORD=FILE writes each distinct specialisation (argument types,
constexprs, options) as JSON, the input of pykernels.triton._compile.compile_for to build them for a GPU target."""
import inspect
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)
os.environ["PYKERNELS_REGISTER_TRITON"] = "1"
MODE = sys.argv[1] if len(sys.argv) > 1 else "eager"
AUTOTUNE = "autotune" in sys.argv[2:]
os.environ["PYKERNELS_ATTN_AUTOTUNE"] = "1" if AUTOTUNE else "0"
os.environ["PYKERNELS_LCE_AUTOTUNE"] = "1" if AUTOTUNE else "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
from triton.runtime import autotuner as _at  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402


class Props:  # only names a real torch._C._CudaDeviceProperties has (checked below)
    name = "fake H100"
    major, minor = 9, 0
    multi_processor_count = 132
    shared_memory_per_block_optin = 232448
    shared_memory_per_block = 49152
    shared_memory_per_multiprocessor = 233472
    L2_cache_size = 50 << 20
    total_memory = 80 << 30
    warp_size = 32
    max_threads_per_block = 1024
    regs_per_multiprocessor = 65536


real = set(dir(torch._C._CudaDeviceProperties))
assert all(a in real for a in vars(Props) if not a.startswith("__")), [a for a in vars(Props) if a not in real]


class StrictProps(Props):
    def __getattribute__(self, a):
        if not a.startswith("__") and a not in real:
            raise AttributeError(f"torch.cuda device properties have no attribute {a!r}")
        return object.__getattribute__(self, a)


torch.cuda.get_device_properties = lambda d=None: StrictProps()
torch.cuda.get_device_capability = lambda d=None: (9, 0)
torch.cuda.current_device = lambda: 0
# (torch.cuda.is_available left False: FakeTensor asks CUDA for real when it is True)
torch.cuda.device_count = lambda: 1

OPTIONS = set(__import__("triton.backends.nvidia.compiler", fromlist=["CUDAOptions"]).CUDAOptions.__dataclass_fields__)
LAUNCHES = []
RECORD = [] if os.environ.get("RECORD") else None
from pykernels.triton._compile import _TRITON_DTYPE as TDT  # noqa: E402
PROBLEMS = []


def fake_run(self, *args, grid, warmup, **kwargs):
    names = self.arg_names
    bound = dict(zip(names, args))
    where = f"{self.fn.__name__}"
    if len(args) > len(names):
        PROBLEMS.append(f"{where}: {len(args)} positional args for {len(names)} params")
    dup = set(bound) & set(kwargs)
    if dup:
        PROBLEMS.append(f"{where}: given twice {sorted(dup)}")
    extra = [k for k in kwargs if k not in names and k not in OPTIONS]
    if extra:
        PROBLEMS.append(f"{where}: unknown keyword(s) {extra} (not params, not CUDA options)")
    meta = {**bound, **{k: v for k, v in kwargs.items() if k in names}}
    missing = [p.name for p in self.params if p.name not in meta and p.default is inspect.Parameter.empty]
    if missing:
        PROBLEMS.append(f"{where}: missing {missing}")
    for p in self.params:
        if p.is_constexpr and p.name in meta and isinstance(meta[p.name], torch.Tensor):
            PROBLEMS.append(f"{where}: constexpr {p.name} given a tensor")
        if not p.is_constexpr and p.name in meta and hasattr(meta[p.name], "device") \
                and meta[p.name].device.type != "cuda":
            PROBLEMS.append(f"{where}: {p.name} on {meta[p.name].device}")
    if "IEEE" in meta:  # exact fp32 dots exactly when the products' operands are fp32 (TF32 rounds them to 10
        # mantissa bits on a GPU; the interpreter's dots are exact either way, so no CPU run would see it)
        operand = next(n for n in ("Q", "X", "WHH") if n in meta)
        if meta["IEEE"] != (meta[operand].dtype == torch.float32):
            PROBLEMS.append(f"{where}: IEEE={meta['IEEE']} for {operand} in {meta[operand].dtype}")
    g = grid(meta) if callable(grid) else grid
    g = tuple(g) + (1,) * (3 - len(g))
    if not (0 < g[0] < 2 ** 31 and 0 < g[1] <= 65535 and 0 < g[2] <= 65535):
        PROBLEMS.append(f"{where}: grid {g} out of CUDA's range")
    opts = {k: v for k, v in kwargs.items() if k in OPTIONS}
    LAUNCHES.append((where, g, opts, {p.name: meta.get(p.name) for p in self.params if p.is_constexpr}))
    if RECORD is not None:
        sig, const = {}, {}
        for p in self.params:
            v = meta.get(p.name, p.default)
            if isinstance(v, torch.Tensor):
                sig[p.name] = "*" + TDT[str(v.dtype)]
            elif p.is_constexpr or v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
                const[p.name] = v  # Triton 3.6 specialises an int argument equal to 1 into a constexpr
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            else:
                sig[p.name] = "fp32"
        RECORD.append(dict(module=self.fn.__module__, name=self.fn.__name__, sig=sig, const=const, opts=opts))


JITFunction.run = fake_run

# Python indexing of a fake CUDA tensor enters a CUDA device guard (cudaSetDevice fails without a driver): route basic
# indexing (ints, slices) through aten ops, which FakeTensorMode handles without the guard.
_getitem, _setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__


def _basic(t, idx):
    if not isinstance(idx, tuple):
        idx = (idx,)
    if not all(isinstance(i, (int, slice)) for i in idx):
        return None
    d = 0
    for i in idx:
        if isinstance(i, int):
            t = torch.ops.aten.select.int(t, d, i)
        else:
            start, stop, step = i.start or 0, i.stop if i.stop is not None else 2 ** 62, i.step or 1
            t = torch.ops.aten.slice.Tensor(t, d, start, stop, step)
            d += 1
    return t


def getitem(self, idx):
    if self.device.type == "cuda":
        v = _basic(self, idx)
        if v is not None:
            return v
    return _getitem(self, idx)


def setitem(self, idx, value):
    if self.device.type == "cuda":
        v = _basic(self, idx)
        if v is not None:
            v.copy_(value)
            return
    return _setitem(self, idx, value)


torch.Tensor.__getitem__, torch.Tensor.__setitem__ = getitem, setitem
_at.Autotuner.do_bench = property(lambda self: (lambda fn, quantiles=None, **kw: (fn(), [1.0, 1.0, 1.0])[1]))

import pykernels  # noqa: E402,F401
from pykernels.triton import attention as ta, cross_entropy as tce, linear_cross_entropy as tlce  # noqa: E402
from pykernels.triton import linear_cross_entropy_fused as tlcef, lstm as tlstm, lstm_layer as tlayer  # noqa: E402
from torch._library.triton import set_wrap_triton_enabled  # noqa: E402

assert not ta._interpreted() and type(ta._attn_fwd).__name__ == "JITFunction"

mode = FakeTensorMode(allow_non_fake_inputs=False)
cases = []


def case(name):
    def dec(f):
        cases.append((name, f))
        return f
    return dec


def r(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


@case("attention dense fwd+bwd bf16 E=64/128/256, causal, bias, dropout, GQA")
def _attn():
    for dt in (torch.bfloat16, torch.float32):
        for E in (64, 128, 256):
            for causal, bias, drop, Hk in ((False, False, 0.0, 8), (True, False, 0.1, 2), (False, True, 0.0, 8)):
                q, k, v = r(2, 8, 300, E, dtype=dt), r(2, Hk, 300, E, dtype=dt), r(2, Hk, 300, E, dtype=dt)
                b = r(1, 1, 300, 300, dtype=dt) if bias else None
                seed = torch.zeros(1, dtype=torch.int64, device="cuda") if drop else None
                o, lse, lo = ta.attention_fwd(q, k, v, b, None, None, 0, 0, 0.1, causal, 0, False, -1, -1, 0.0, drop,
                                              seed)
                ta.attention_bwd(o, q, k, v, o, lse, lo, b, None, None, 0, 0, 0.1, causal, 0, False, -1, -1, 0.0,
                                 drop, seed, bias)


@case("attention varlen fwd+bwd bf16")
def _attn_varlen():
    q, k, v = r(700, 8, 128), r(900, 4, 128), r(900, 4, 128)
    cu_q = torch.empty(3, device="cuda", dtype=torch.int32)
    cu_k = torch.empty(3, device="cuda", dtype=torch.int32)
    o, lse, lo = ta.attention_fwd(q, k, v, None, cu_q, cu_k, 400, 500, 0.1, True, 0, True, -1, -1, 30.0, 0.0, None)
    ta.attention_bwd(o, q, k, v, o, lse, lo, None, cu_q, cu_k, 400, 500, 0.1, True, 0, True, -1, -1, 30.0, 0.0,
                     None, False)


@case("attention dropout_mask")
def _dmask():
    ta.dropout_mask(torch.zeros(1, dtype=torch.int64, device="cuda"), 2, 4, 300, 300, 0.1)


@case("cross_entropy fwd/bwd/scale bf16+fp32, weight, smoothing, z-loss, probs")
def _ce():
    for dt in (torch.bfloat16, torch.float32):
        x = r(64, 50257, 1, dtype=dt)
        t = torch.randint(0, 50257, (64,), device="cuda")
        w = r(50257, dtype=torch.float32)
        for write_grad in (False, True):
            loss, lse, g, err = tce.cross_entropy_fwd(x, t, w, None, -100, 0.1, 1e-4, write_grad)
        tce.cross_entropy_bwd(r(64, dtype=torch.float32), x, t, w, lse, err, -100, 0.1, 1e-4)
        tce.cross_entropy_scale_grad_(g, torch.ones(1, device="cuda"))
        tp = torch.softmax(x.float(), 1).to(dt)
        tce.cross_entropy_fwd(x, tp, None, None, -100, 0.0, 0.0, True)


@case("linear_cross_entropy fwd+bwd bf16/fp32 (bias, class weight, smoothing, softcap)")
def _lce():
    for dt in (torch.bfloat16, torch.float32):
        N, H, V = 1000, 256, 32000
        x, W, b = r(N, H, dtype=dt), r(V, H, dtype=dt), r(V, dtype=dt)
        t = torch.randint(0, V, (N,), device="cuda")
        cw = r(V, dtype=torch.float32)
        for bias, smooth, softcap in ((None, False, 0.0), (b, True, 30.0)):
            m, ls, zy, zs = tlce.linear_cross_entropy_fwd(x, W, bias, t, cw if smooth else None, 0, softcap, smooth)
            c = r(N, dtype=torch.float32)
            tlce.linear_cross_entropy_bwd(x, W, bias, t, cw if smooth else None, m, ls, c, c, c, 0, softcap, smooth,
                                          True, True, bias is not None)


@case("linear_cross_entropy fused bf16")
def _lcef():
    N, H, V = 600, 256, 5000
    x, W, b = r(N, H), r(V, H), r(V)
    t = torch.randint(0, V, (N,), device="cuda")
    c = r(N, dtype=torch.float32)
    tlcef.linear_cross_entropy_fused(x, W, b, t, None, c, c, c, c, 0.0, False, 256, True, True, True)


@case("lstm cell fwd/bwd bf16/fp32 H=256/1024")
def _cell():
    for dt in (torch.bfloat16, torch.float32):
        for H in (256, 1024):
            x, h, c = r(32, 128, dtype=dt), r(32, H, dtype=dt), r(32, H, dtype=dt)
            hy, cy, ws = tlstm.lstm_cell_fwd(x, h, c, r(4 * H, 128, dtype=dt), r(4 * H, H, dtype=dt),
                                             r(4 * H, dtype=dt), r(4 * H, dtype=dt))
            tlstm.lstm_cell_bwd(hy, cy, c, ws)
            tlstm.lstm_cell_bwd(None, cy, c, ws)


@case("lstm layer fwd/bwd bf16/fp32 H=128 (row block), 768, 2048, 8192 (split)")
def _layer():
    for dt in (torch.bfloat16, torch.float32):
        for H in (128, 768, 2048, 8192):
            T, B = 5, 16
            xp = r(T, B, 4 * H, dtype=torch.float32)
            w = r(4 * H, H, dtype=dt)
            h0, c0 = r(B, H, dtype=dt), r(B, H, dtype=dt)
            out, ws = tlayer.lstm_layer_fwd(xp, w, h0, c0, False)
            tlayer.lstm_layer_bwd(out, h0, c0, c0, ws, w, True)
            tlayer.lstm_layer_bwd(None, None, c0, c0, ws, w, False)


ok = 0
for name, f in cases:
    before = len(PROBLEMS)
    try:
        with mode, set_wrap_triton_enabled(MODE == "compile"):
            f()
        status = "ok" if len(PROBLEMS) == before else "PROBLEMS"
    except Exception as e:  # noqa: BLE001
        status = f"RAISED {type(e).__name__}: {str(e)[:600]}"
        traceback.print_exc(limit=-6, file=sys.stderr)
    print(f"[{MODE}{' autotune' if AUTOTUNE else ''}] {name}: {status}")
print(f"launches checked: {len(LAUNCHES)}; problems: {len(PROBLEMS)}")
for p in sorted(set(PROBLEMS)):
    print("  PROBLEM", p)
if RECORD is not None:
    import json
    uniq = {json.dumps(r, sort_keys=True) for r in RECORD}
    with open(os.environ["RECORD"], "w") as f:
        json.dump([json.loads(u) for u in sorted(uniq)], f)
    print("recorded", len(uniq), "unique launch specialisations")
if os.environ.get("DUMP"):
    seen = set()
    for w, g, o, c in LAUNCHES:
        key = (w, tuple(sorted(o.items())), tuple(sorted((k, str(v)) for k, v in c.items())))
        if key not in seen:
            seen.add(key)
            print("  LAUNCH", w, g, o, c)
