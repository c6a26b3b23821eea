"""What a result was measured on: device, driver, library versions, commit, UTC date (no hostname)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch


def git_commit() -> str:
    if os.environ.get("PYKERNELS_GIT_COMMIT"):  # set by bench/gpu_check.sh callers: a device copy has no .git
        return os.environ["PYKERNELS_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
        return out if len(out) == 40 else "unknown"
    except Exception:
        return "unknown"


def git_dirty() -> Optional[bool]:
    """Whether tracked files differ from the commit (then the commit alone does not say what ran)."""
    if os.environ.get("PYKERNELS_GIT_COMMIT"):  # a device copy: the caller says (PYKERNELS_GIT_DIRTY=1 if so)
        return os.environ.get("PYKERNELS_GIT_DIRTY") == "1"
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except Exception:
        return None


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:
        return f"absent ({type(e).__name__})"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        if out:
            return out.splitlines()[0]
    except Exception:
        pass
    return "unknown"


def environment(device: torch.device) -> dict:
    # other processes' load at the start (1-minute average): on a busy machine CPU times are noisy, and a provider
    # sharing a core with another process can read many times slower
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "git_dirty": git_dirty(), "python": platform.python_version(),
           "torch": torch.__version__, "triton": _version("triton"), "pykernels": _version("pykernels"),
           "cuda": torch.version.cuda, "device": device.type, "cores": os.cpu_count(), "load_avg": load,
           "busy": load is not None and load > 0.75 * (os.cpu_count() or 1)}
    try:
        env["cudnn"] = torch.backends.cudnn.version()
    except Exception:
        env["cudnn"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device_name=p.name, gpu=p.name, sm_count=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1), driver=_driver())
    else:
        # the same CPU name can hide different vector units (VMs sold as "AMD EPYC" with and without AVX-512), and
        # torch's 16-bit CPU paths depend on them: record torch's capability and oneDNN's native 16-bit dtypes, and
        # the ISA our own C++ CPU kernels ran at (AVX512 where pykernels._C_avx512 is in use)
        from pykernels import _ext, _native
        cap, name = torch.backends.cpu.get_cpu_capability(), _cpu_name()
        env.update(device_name=f"{name} ({cap})", cpu=name, threads=torch.get_num_threads(), cpu_capability=cap,
                   onednn_dtypes=sorted(str(d).replace("torch.", "") for d in _native.ONEDNN_DTYPES),
                   pykernels_cpu_kernels=_ext.cpu_kernels)
    return env
