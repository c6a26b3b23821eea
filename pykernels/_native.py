"""torch's own functions, as they were when pykernels was imported, and what torch's CPU kernels can do on this
machine. The paths that hand a call to torch's kernel (backends.prefer_native) call these functions:
``pykernels.patch_functional`` rebinds the names in torch.nn.functional to pykernels' functions, and through them
those paths would call back into pykernels."""
import torch
import torch.nn.functional as _F

cross_entropy = _F.cross_entropy
scaled_dot_product_attention = _F.scaled_dot_product_attention
linear_cross_entropy = getattr(_F, "linear_cross_entropy", None)  # torch >= 2.13


def _onednn_has(check: str) -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a torch without oneDNN or without the query
        return False


# The 16-bit dtypes in which torch's CPU GEMMs and oneDNN's RNN primitive run natively on this CPU (bf16: AVX512-BF16
# or AMX; fp16: AVX512-FP16 or AMX-FP16), torch's own test (``mkldnn_bf16_device_check``). Elsewhere torch's bf16
# GEMMs fall back to a generic loop: measured 5-35x slower than fp32 ones on an AVX2-only AMD EPYC (2026-12-05), and
# its CPU LSTM under autocast to that dtype fails ("could not create a primitive descriptor for the LSTM forward
# propagation primitive"), since its autocast path asks oneDNN for the 16-bit RNN without that check.
ONEDNN_DTYPES = frozenset(d for d, check in ((torch.bfloat16, "_is_mkldnn_bf16_supported"),
                                             (torch.float16, "_is_mkldnn_fp16_supported")) if _onednn_has(check))


def gemm_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype in which our GEMMs on operands like t run (C++ twin: csrc/cpu/gemm_dtype.h): on the CPU float32 for
    float16 (torch's CPU fp16 GEMMs measured 5-100x slower than fp32 ones) and for bfloat16 where oneDNN has no bf16
    GEMM (``ONEDNN_DTYPES``): fp32 on converted operands, rounded once. Else t's own."""
    if t.device.type == "cpu" and (t.dtype == torch.float16 or
                                   (t.dtype == torch.bfloat16 and torch.bfloat16 not in ONEDNN_DTYPES)):
        return torch.float32
    return t.dtype


# torch's CPU capability ("AVX512", "AVX2", "DEFAULT", or an ARM / POWER / Z one): our CPU extension is built for
# AVX2 while oneDNN JITs for what the CPU has, so on x86 CPUs without AVX-512 oneDNN loses its 2x wider vectors and
# some of the measured rules differ (backends.OURS_FASTER_DTYPE_AVX2).
CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()
