"""Test tiers.

CPU tier (CI): the reference, the C++ CPU kernels, the Triton kernels under TRITON_INTERPRET=1 (set it for
the whole run: ``TRITON_INTERPRET=1 pytest``), Triton kernels compiled for sm_80/sm_90, the CUDA sources built.
GPU tier (``pytest -m gpu``): the same checks on CUDA tensors; skipped without a GPU.

With PYKERNELS_REQUIRE_EXTENSION=1 (set by CI) a backend that should exist here but does not is a failure,
not a skip: a broken build must not pass as "skipped".
"""
from __future__ import annotations

import os
import random
import warnings
import zlib

# torch's inductor cache does not key on ATEN_CPU_CAPABILITY (README, "Environment variables"): a run at a lowered
# level read kernels compiled for the other vector width from the shared cache (test_compile_fullgraph_parity[cpu]
# failed so). One cache per level, unless the caller chose one; before the imports, whose first inductor use fixes
# the directory (and sets the variable).
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"pykernels_inductor_{os.environ['ATEN_CPU_CAPABILITY']}")

import pytest  # noqa: E402
import torch  # noqa: E402

import pykernels  # noqa: E402

SEED = int(os.environ.get("PYKERNELS_TEST_SEED", random.SystemRandom().randrange(2**31)))
os.environ["PYKERNELS_TEST_SEED"] = str(SEED)  # pytest-xdist workers (and test subprocesses) inherit the header's seed
HAS_CUDA = torch.cuda.is_available()
# k: every Hypothesis fuzz test runs k times its example budget (a bug hunt; the README lists the variable)
FUZZ_SCALE = int(os.environ.get("PYKERNELS_FUZZ_SCALE", "1"))


def pytest_report_header(config):
    info = pykernels.build_info()
    return [f"pykernels test seed: {SEED} (set PYKERNELS_TEST_SEED to replay)",
            f"torch {torch.__version__}, cuda available: {HAS_CUDA}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}",
            f"extension: loaded={info['loaded']} with_cuda={info.get('with_cuda')} error={info['load_error']} "
            f"cpu_kernels={info['cpu_kernels']} ({info['cpu_kernels_note'] or 'AVX-512 library in use'})",
            f"backends: {pykernels.available_backends()}"]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with -m gpu)")
    config.addinivalue_line("markers", "slow: long-running")
    # Hypothesis draws its examples from SEED too (unless --hypothesis-seed is given), so that the seed in the report
    # header replays a fuzz failure along with the rest of the run.
    try:
        import hypothesis.core
    except ImportError:  # the fuzz tests skip themselves
        return
    if config.getoption("--hypothesis-seed", None) is None:
        hypothesis.core.global_force_seed = SEED


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    # A different but replayable stream per test: fresh random data every run, never zeros.
    # (zlib.crc32, not hash(): Python salts str hashes per process, so PYKERNELS_TEST_SEED would not replay a run)
    torch.manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()) % 100_000)
    yield


@pytest.fixture(params=["wide", "base"])
def cpu_kernel_level(request):
    """Runs a test at each ISA level of the C++ CPU kernels this machine has: _C_avx512's kernels registered into _C
    ("wide", where they load here) and _C's own ("base"), then restores what the import chose."""
    from pykernels import _ext
    chosen = _ext.cpu_kernels == "AVX512"
    if request.param == "wide" and not chosen:
        pytest.skip(f"no AVX-512 CPU kernels here: {_ext.wide_error or _ext.load_error}")
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if request.param == "wide" and any(str(v).startswith("cuda") for k, v in params.items() if k in ("device", "dev")):
        pytest.skip("a CUDA test: the CPU kernels' ISA level does not change what it runs (its 'base' run covers it)")
    _ext.set_wide_kernels(request.param == "wide")
    yield request.param
    # as the import: set_wide_kernels(True), which registers them where they load and otherwise keeps the reason why
    # not (set_wide_kernels(False) on a CPU without AVX-512 replaced "this CPU lacks AVX-512" by "switched off")
    _ext.set_wide_kernels(True)
    assert (_ext.cpu_kernels == "AVX512") == chosen, _ext.wide_error


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_python(code: str, **env_vars: str) -> str:
    """The last stdout line of ``code`` run in a fresh interpreter that imports from this checkout, with the extension
    enabled and ``env_vars`` set (for what a process reads once, e.g. ATEN_CPU_CAPABILITY); fails on a non-zero exit."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "PYKERNELS_DISABLE_EXTENSION"}
    env.update(env_vars)
    p = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); {code}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


def run_script_compiled(script: str, **fmt):
    """Run ``script.format(root=ROOT, **fmt)`` in a fresh interpreter without TRITON_INTERPRET (so that Triton
    compiles for real GPU targets, no GPU needed) and return the JSON printed on its last stdout line."""
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", script.format(root=ROOT, **fmt)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def skip_unless_required(why: str) -> None:
    """Skip for ``why`` (something this run lacks: the C++ kernels, the Triton interpreter), except where the run
    must have it (PYKERNELS_REQUIRE_EXTENSION=1, as CI): there a skip would hide a broken build, so fail."""
    if os.environ.get("PYKERNELS_REQUIRE_EXTENSION") == "1":
        pytest.fail(f"this run must have it, but: {why}")
    pytest.skip(why)


def require_backend(name: str, device: str) -> None:
    why = pykernels.available_backends(device)[name]
    if why is None:
        return
    expected_here = (name == "cpu" or (name == "triton" and device == "cpu")) and \
        os.environ.get("PYKERNELS_REQUIRE_EXTENSION") == "1"
    if expected_here:
        pytest.fail(f"backend {name} on {device} must be usable in this run but is not: {why}")
    pytest.skip(f"backend {name} unusable on {device}: {why}")


def backend_params(include_reference: bool = True):
    """(backend, device) pairs: the CPU tier's and, marked gpu, the GPU tier's."""
    cpu = [pytest.param("cpu", "cpu", id="cpu"), pytest.param("triton", "cpu", id="triton-interp")]
    if include_reference:
        cpu.insert(0, pytest.param("reference", "cpu", id="reference"))
    gpu = [pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
           pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu)]
    return cpu + gpu


def assert_spill_budget(what: str, n_spills: int, known: dict, key) -> None:
    """No ptxas spills (bytes of spill stores, pykernels.triton._compile.spills), except the kernels in ``known``:
    spills measured when the check learned to see ptxas's own spills (2026-12-03; before, it counted local stores in
    the PTX, which never shows them). Those are defects on record in the issue notes: they must not grow, and a
    kernel that stops spilling should leave the table."""
    budget = known.get(key, 0)
    if n_spills > budget and not spill_budgets_apply():
        warnings.warn(f"{what}: {n_spills} bytes of spill stores (budget {budget}, measured with Triton "
                      f"{SPILLS_MEASURED_WITH}; this is {triton_version()})")
        return
    assert n_spills <= budget, f"{what}: {n_spills} bytes of spill stores (budget {budget})"


# The spill budgets (and register counts) are facts of one Triton release's compiler: another release allocates
# registers differently (Triton 3.6 spills 12-520 bytes where 3.8 spills 0-112). Elsewhere they only warn.
SPILLS_MEASURED_WITH = "3.8"


def triton_version() -> str:
    import triton
    return triton.__version__


def spill_budgets_apply() -> bool:
    return triton_version().startswith(SPILLS_MEASURED_WITH + ".")
