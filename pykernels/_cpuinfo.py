"""Whether this machine's CPU has AVX2 (with FMA): the hardware, asked by setup.py (whether to build _C for AVX2) and
by _ext (whether an AVX2 build may load here). Not torch.backends.cpu.get_cpu_capability(): that is the level torch
dispatches its own kernels at, which ATEN_CPU_CAPABILITY lowers on any CPU. setup.py loads this file by its path,
before pykernels can be imported: it must import nothing from pykernels."""
from __future__ import annotations

import platform


def _proc_cpuinfo_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[-1].split()}
    except OSError:
        return set()


def has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = _proc_cpuinfo_flags()
    if flags:  # the build uses -mavx2 -mfma: a VM can mask FMA while showing AVX2, so both, as the kernel reports
        return "avx2" in flags and "fma" in flags
    try:  # no /proc/cpuinfo: CPUID through torch's cpuinfo (it asks for AVX2 alone; real AVX2 CPUs have FMA3)
        import torch
        return bool(torch.cpu._is_avx2_supported())
    except (ImportError, AttributeError, RuntimeError):
        return False


def has_avx512() -> bool:
    """AVX-512 F, BW, VL and DQ, what pykernels._C_avx512 is compiled for (at::vec's AVX512 level asks the same)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= _proc_cpuinfo_flags()
