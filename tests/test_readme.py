"""README.md's Layout section names paths that exist (it listed pykernels/functional.py after functional became a
package)."""
from __future__ import annotations

import glob
import os
import re

from conftest import ROOT


def test_layout_paths_exist():
    with open(os.path.join(ROOT, "README.md")) as f:
        block = re.search(r"## Layout\s*```(.*?)```", f.read(), re.S).group(1)
    paths = []
    for line in block.strip().splitlines():
        names = [p for p in re.split(r",\s*", line.split("  ")[0].strip()) if p]
        # "a/b/, c/": c/ is a sibling of b/, written short
        paths += [names[0]] + [os.path.join(os.path.dirname(names[0].rstrip("/")), n) for n in names[1:]]
    assert len(paths) > 10, paths
    missing = [p for p in paths if not glob.glob(os.path.join(ROOT, p.replace("<op>", "*")))]
    assert not missing, f"README's Layout names paths that do not exist: {missing}"


# How code reads a variable: os.environ[...] / .get(...), getenv(...) (Python and C++), the kernels' knob(...) helpers.
_ENV_READ = re.compile(r"""(?:environ(?:\.get)?\s*[\(\[]\s*|getenv\s*\(\s*|knob\(\s*|setdefault\(\s*)["']"""
                       r"""(PYKERNELS_[A-Z0-9_]+)["']""")
_ENV_READERS = ("pykernels/**/*.py", "csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.h", "csrc/**/*.cuh", "setup.py",
                "tests/**/*.py", "bench/**/*.py")


def test_environment_variables_table_lists_every_variable_read():
    """README's "Environment variables" table names exactly the PYKERNELS_* variables that the library, its build,
    the tests and the benchmarks read (16 of them, the CE tuning knobs among them, were documented nowhere)."""
    read = {}
    for pattern in _ENV_READERS:
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            with open(path, errors="ignore") as f:
                for name in _ENV_READ.findall(f.read()):
                    read.setdefault(name, os.path.relpath(path, ROOT))
    with open(os.path.join(ROOT, "README.md")) as f:
        section = re.search(r"## Environment variables\n(.*?)\n## ", f.read(), re.S).group(1)
    listed = set(re.findall(r"^\| `(PYKERNELS_[A-Z0-9_]+)` \|", section, re.M))
    assert len(read) > 20, read
    missing = {n: p for n, p in read.items() if n not in listed}
    assert not missing, f"read but not in README's Environment variables table: {missing}"
    assert not listed - set(read), f"README's table lists variables nothing reads: {listed - set(read)}"
