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
