"""Checks a built sdist and wheel against the source tree they came from (stdlib only).

Usage: package_contents.py ROOT SDIST WHEEL. The expected lists are read from the tree, never written
down here, so a new subpackage or header is checked the day it is added.
"""
import sys
import tarfile
import zipfile
from pathlib import Path

root, sdist, wheel = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


def tree_packages() -> dict[str, Path]:
    """Import name -> directory, for every directory under mnn_fast/ and kernels/ holding Python files
    (a directory missing its __init__.py is a package the wheel would drop, so it counts here)."""
    found = {}
    for top, name in ((root / "mnn_fast", "mnn_fast"), (root / "kernels", "mnn_fast.kernels")):
        for d in [top, *sorted(p for p in top.rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts or not any(d.glob("*.py")):
                continue
            rel = d.relative_to(top).parts
            found[".".join((name, *rel))] = d
    return found


def fail(msg: str) -> None:
    print(f"package check: {msg}", file=sys.stderr)
    sys.exit(1)


packages = tree_packages()
names = set(zipfile.ZipFile(wheel).namelist())
for pkg, directory in packages.items():
    base = pkg.replace(".", "/")
    for py in sorted(directory.glob("*.py")):
        if f"{base}/{py.name}" not in names:
            fail(f"the wheel lacks {base}/{py.name} (package {pkg})")
for extension in ("_C", "_serving"):
    if not any(n.startswith(f"mnn_fast/{extension}") and n.endswith(".so") for n in names):
        fail(f"the wheel holds no compiled extension mnn_fast/{extension}*.so")
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
    fail("the wheel's metadata carries no LICENSE")
print(f"wheel: {len(packages)} packages of the tree, all present: {', '.join(sorted(packages))}")

with tarfile.open(sdist) as tar:
    members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
needed = [p.relative_to(root).as_posix() for p in sorted((root / "csrc").rglob("*"))
          if p.suffix in {".h", ".cuh", ".cpp", ".cu"}]
needed += [p.relative_to(root).as_posix() for d in packages.values() for p in sorted(d.glob("*.py"))]
needed += ["README.md", "LICENSE", "CHANGELOG.md", "CITATION.cff", "setup.py", "pyproject.toml", "MANIFEST.in"]
missing = [n for n in needed if n not in members]
if missing:
    fail(f"the sdist lacks {len(missing)} file(s): {', '.join(missing[:10])}")
print(f"sdist: all {len(needed)} sources, headers and documents of the tree present")
