"""The source distribution: it holds every C++/CUDA file the build needs, and a wheel built from it (CPU kernels;
the CUDA part is the same setup.py with more sources, checked by test_build on the checkout) imports and runs.
Until MANIFEST.in, the sdist had the .cpp/.cu files setup.py names but none of the headers they include."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from conftest import ROOT

SKIP = shutil.ignore_patterns(".git", "build", "dist", "*.so", "__pycache__", "*.egg-info", ".hypothesis",
                              ".benchmarks", ".pytest_cache", "results", "out", "_build_info.json")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _run(cmd, cwd, env=None, timeout=900):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """An sdist of a copy of this checkout (setup.py sdist writes egg-info next to setup.py: not into the tree
    the other tests import)."""
    tmp = tmp_path_factory.mktemp("sdist")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    _run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp / "dist")], cwd=src)
    (path,) = (tmp / "dist").glob("pykernels-*.tar.gz")
    return path


def _members(path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        root = tar.getnames()[0].split("/")[0]
        return {m.name[len(root) + 1:]: m for m in tar.getmembers() if m.isfile()}


def test_sdist_holds_every_csrc_file_and_include(sdist):
    names = _members(sdist)
    ours = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "csrc")) for f in fs}
    assert ours, "no csrc files found in the checkout"
    missing = sorted(ours - set(names))
    assert not missing, f"sdist lacks {missing}"
    # Every quoted #include of a shipped source resolves to a shipped file (next to it, or from csrc/).
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split("/")[0]
        for name in (n for n in names if n.startswith("csrc/")):
            text = tar.extractfile(f"{root}/{name}").read().decode()
            for inc in INCLUDE.findall(text):
                here = os.path.normpath(os.path.join(os.path.dirname(name), inc))
                assert here in names or os.path.normpath(os.path.join("csrc", inc)) in names, \
                    f"{name} includes {inc!r}, which the sdist does not hold"
    for f in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        assert f in names, f"sdist lacks {f}"


@pytest.mark.slow
def test_wheel_built_from_sdist_imports_and_runs(sdist, tmp_path):
    """`pip wheel <sdist>` (CPU kernels only: ~90 s on 2 cores) gives a wheel whose _C loads against this torch and
    whose cpu backend computes cross-entropy as torch does, imported from outside the checkout."""
    env = dict(os.environ, PYKERNELS_SKIP_CUDA_BUILD="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
          "--disable-pip-version-check", str(sdist), "-w", str(tmp_path / "wheel")], cwd=tmp_path, env=env)
    (whl,) = (tmp_path / "wheel").glob("pykernels-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        assert "pykernels/_build_info.json" in names and any(n.startswith("pykernels/_C") for n in names), names
        z.extractall(site)
    script = (
        "import json, torch, pykernels\n"
        f"assert pykernels.__file__.startswith({str(site)!r}), pykernels.__file__\n"
        "info = pykernels.build_info()\n"
        "assert info['loaded'] and info['torch_version'] == torch.__version__, info\n"
        "assert pykernels.available_backends('cpu')['cpu'] is None, pykernels.available_backends('cpu')\n"
        "x = torch.randn(37, 1001, dtype=torch.float64, requires_grad=True); t = torch.randint(0, 1001, (37,))\n"
        "ours = pykernels.functional.cross_entropy(x, t, backend='cpu')\n"
        "ref = torch.nn.functional.cross_entropy(x, t)\n"
        "torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)\n"
        "print(json.dumps({'ok': True}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(site)
    out = _run([sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=300)
    assert out.strip().endswith('{"ok": true}'), out
