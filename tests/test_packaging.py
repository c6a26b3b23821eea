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
                              ".benchmarks", ".pytest_cache", "out", "_build_info.json")
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
    (src / "pykernels" / "_build_info.json").write_text("{}")  # a checkout after an in-place build has one
    _run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp / "dist")], cwd=src)
    (path,) = (tmp / "dist").glob("pykernels-*.tar.gz")
    return path


def _require_bdist_wheel():
    """Building a wheel (and build_editable) without build isolation uses the build requirements already installed:
    pyproject's `wheel` (setuptools >= 70.1 has bdist_wheel itself). Without either it is the environment that is
    incomplete ("invalid command 'bdist_wheel'"), not the package."""
    import importlib.metadata as md
    import importlib.util
    major, minor = (int(x) for x in md.version("setuptools").split(".")[:2])
    if (major, minor) < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.skip("no bdist_wheel here: install pyproject's build requirement `wheel` (or setuptools >= 70.1)")


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


def test_sdist_holds_the_measurements_cited_and_no_build_record(sdist):
    """README.md, docs/results.md and backends.py cite bench/results/ files as their evidence, and tests/ (shipped) read
    them: the sdist held tests/ but not bench/results/. A _build_info.json would describe a library the sdist does not
    ship."""
    names = _members(sdist)
    cited = set()
    for f in ("README.md", "docs/results.md", "pykernels/backends.py"):
        with open(os.path.join(ROOT, f)) as fh:
            cited |= set(re.findall(r"bench/results/[\w./-]+\.(?:jsonl?|png)", fh.read()))
    assert len(cited) > 10, cited
    missing = sorted(c for c in cited if c not in names)
    assert not missing, f"sdist lacks {len(missing)} cited measurements, e.g. {missing[:3]}"
    assert {"bench/__main__.py", "bench/render.py", "bench/gpu_check.sh"} <= set(names)
    assert not any(n.startswith("bench/out/") for n in names)
    assert "pykernels/_build_info.json" not in names


def test_installs_pykernels_alone(sdist):
    """The benchmark harness runs from a checkout or the unpacked sdist (it reads README.md, docs/, bench/results/):
    the wheel installed it as a top-level package named plain `bench`, with a `pykernels-bench` script, both broken
    outside the checkout."""
    with tarfile.open(sdist) as tar:
        info = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if "/pykernels.egg-info/" in m.name}
        assert tar.extractfile(info["top_level.txt"]).read().decode().split() == ["pykernels"]
        assert "entry_points.txt" not in info or b"bench" not in tar.extractfile(info["entry_points.txt"]).read()


def test_test_extra_installs_the_plugins_of_the_readme_test_command():
    """README's test command (CI's) passes --benchmark-disable, an option of pytest-benchmark, and -n, pytest-xdist's:
    `.[test]` must install them, or pytest stops at "unrecognized arguments" on a fresh machine."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "README.md")) as f:
        m = re.search(r'pip install --no-build-isolation -e "\.\[([a-z,]+)\]" && TRITON_INTERPRET=1 python -m pytest '
                      r"([^\n`]*)", f.read())
    assert m, "README's test command not found"
    reqs = [r for extra in m.group(1).split(",") for r in project["optional-dependencies"][extra]]
    reqs += project["dependencies"]
    if "--benchmark-disable" in m.group(2):
        assert any(re.match(r"pytest[-_]benchmark\b", r) for r in reqs), reqs
    if re.search(r"(^| )-n ", m.group(2)):
        assert any(re.match(r"pytest[-_]xdist\b", r) for r in reqs), reqs
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert '-e ".[test]"' in f.read()


def _tiny_tree(tmp_path):
    """(checkout, env): a copy of the build files and the package's Python code whose csrc/ holds one trivial
    source, built in seconds (CPU only, one job), not a build of _C."""
    src = tmp_path / "src"
    (src / "csrc").mkdir(parents=True)
    for f in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, f), src)
    shutil.copytree(os.path.join(ROOT, "pykernels"), src / "pykernels", ignore=SKIP)
    (src / "csrc" / "tiny.cpp").write_text("int pykernels_tiny() { return 1; }\n")
    return src, dict(os.environ, PYKERNELS_SKIP_CUDA_BUILD="1", MAX_JOBS="1")


def _build_editable(src, env):
    """The build backend's hook that `pip install --no-build-isolation -e .` calls."""
    hook = f"from setuptools import build_meta; build_meta.build_editable({str(src.parent / 'editable')!r})"
    _run([sys.executable, "-c", hook], cwd=src, env=env)


def test_build_record_is_written_only_where_the_library_is(tmp_path):
    """build_ext writes _build_info.json next to _C. A build into build_lib (`pip wheel .`, `pip install .`, `python -m
    build`) wrote it into the checkout too, where it then described another build's library, or none. `pip install
    -e .` (setuptools' build_editable) must still write it into the checkout, where the package imports it from.
    A copy of the tree whose csrc/ holds one trivial source: seconds, not a build of _C."""
    _require_bdist_wheel()
    src, env = _tiny_tree(tmp_path)
    lib = tmp_path / "build_lib"
    _run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp",
          str(tmp_path / "build_temp")], cwd=src, env=env)
    assert list((lib / "pykernels").glob("_C*.so")) and (lib / "pykernels" / "_build_info.json").exists()
    assert not list((src / "pykernels").glob("_C*"))
    assert not (src / "pykernels" / "_build_info.json").exists(), "a build into build_lib wrote into the checkout"
    _build_editable(src, env)
    assert list((src / "pykernels").glob("_C*.so")) and (src / "pykernels" / "_build_info.json").exists()


def _expected_cpu_kernels() -> str:
    """The ISA a fresh build's CPU kernels run at on this machine (x86-64: AVX-512 where torch dispatches at it)."""
    import platform

    import torch

    from pykernels import _cpuinfo
    if platform.machine().lower() in ("x86_64", "amd64") and _cpuinfo.has_avx512() and \
            torch.backends.cpu.get_cpu_capability() == "AVX512":
        return "AVX512"
    return "AVX2" if _cpuinfo.has_avx2() else "DEFAULT"


def test_a_wide_library_that_fails_to_build_leaves_the_build_standing(tmp_path):
    """csrc/cpu/avx512/ that does not compile (a compiler without AVX-512): the build ends with _C, a warning, and a
    record without the library, so that import never looks for it."""
    import json
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the AVX-512 library is built on x86-64 only")
    src, env = _tiny_tree(tmp_path)
    (src / "csrc" / "cpu" / "avx512").mkdir(parents=True)
    (src / "csrc" / "cpu" / "avx512" / "broken.cpp").write_text("#error no AVX-512 here\n")
    p = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pykernels._C_avx512 was not built" in p.stderr, p.stderr[-3000:]
    assert list((src / "pykernels").glob("_C.*.so")) and not list((src / "pykernels").glob("_C_avx512*"))
    assert json.loads((src / "pykernels" / "_build_info.json").read_text())["wide_cpu_libraries"] == []
    _require_bdist_wheel()  # and as `pip install --no-build-isolation -e .` builds it
    _build_editable(src, env)
    assert json.loads((src / "pykernels" / "_build_info.json").read_text())["wide_cpu_libraries"] == []


@pytest.mark.slow
def test_wheel_built_from_sdist_imports_and_runs(sdist, tmp_path):
    """`pip wheel <sdist>` (CPU kernels only, at -O0: DEBUG=1 compiles faster than -O3, and the optimiser is not what
    this checks) gives a wheel whose _C loads against this torch and whose cpu backend computes cross-entropy as torch does,
    imported from outside the checkout."""
    _require_bdist_wheel()
    env = dict(os.environ, PYKERNELS_SKIP_CUDA_BUILD="1", DEBUG="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
          "--disable-pip-version-check", str(sdist), "-w", str(tmp_path / "wheel")], cwd=tmp_path, env=env)
    (whl,) = (tmp_path / "wheel").glob("pykernels-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        assert "pykernels/_build_info.json" in names and any(n.startswith("pykernels/_C") for n in names), names
        assert not any(n.startswith("bench/") for n in names), "the wheel installs the benchmark harness"
        z.extractall(site)
    script = (
        "import json, torch, pykernels\n"
        f"assert pykernels.__file__.startswith({str(site)!r}), pykernels.__file__\n"
        "info = pykernels.build_info()\n"
        "assert info['loaded'] and info['torch_version'] == torch.__version__, info\n"
        "assert pykernels.available_backends('cpu')['cpu'] is None, pykernels.available_backends('cpu')\n"
        # the AVX-512 library travels in the wheel and loads where the checkout's does
        f"assert info['cpu_kernels'] == {_expected_cpu_kernels()!r}, info\n"
        "x = torch.randn(37, 1001, dtype=torch.float64, requires_grad=True); t = torch.randint(0, 1001, (37,))\n"
        "ours = pykernels.functional.cross_entropy(x, t, backend='cpu')\n"
        "ref = torch.nn.functional.cross_entropy(x, t)\n"
        "torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)\n"
        "print(json.dumps({'ok': True}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(site)
    out = _run([sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=300)
    assert out.strip().endswith('{"ok": true}'), out
