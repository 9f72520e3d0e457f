"""Build the offline wheelhouse for `app_install_mode: offline` (make wheelhouse).

    python ansible/build_wheelhouse.py PROJECT_WHEEL OUT_DIR [--target-python 3.11.2]

`pip wheel` resolves for the Python that runs it, and a dependency's markers
can differ on the server's Python: redis needs async-timeout only below
3.11.3, and Debian 12's Python is 3.11.2. So after pip's pass this script
evaluates every wheel's requirements for the target Python and adds what is
missing, until nothing is. torch is pinned; `--torch-variant cuda` takes its
CUDA build (PyPI's Linux wheel, with the nvidia-* runtime wheels it needs:
several GB) for a server with a GPU (Ansible: app_torch_variant: cuda).
"""

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

TORCH = "torch==2.13.0"
PYPI = "https://pypi.org/simple"  # its Linux torch wheel is the CUDA build


def requirements(wheel):
    """The Requires-Dist lines of a wheel's metadata."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = archive.read(name).decode()
    lines = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [Requirement(line.split(":", 1)[1].strip()) for line in lines]


def missing(folder, environment):
    """Requirements that apply on the target but have no wheel in `folder`."""
    wheels = list(folder.glob("*.whl"))
    present = {parse_wheel_filename(w.name)[0] for w in wheels}
    wanted = set()
    for wheel in wheels:
        for req in requirements(wheel):
            applies = req.marker is None or req.marker.evaluate(dict(environment, extra=""))
            if applies and canonicalize_name(req.name) not in present:
                wanted.add(str(Requirement(f"{req.name}{req.specifier}")))
    return sorted(wanted)


def build(project_wheel, out, target_python, torch_variant="cpu"):
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(out)]
    if torch_variant == "cuda":
        subprocess.run([*pip, "--index-url", PYPI, TORCH], check=True)
    subprocess.run([*pip, TORCH, str(project_wheel)], check=True)
    environment = default_environment()
    environment.update(python_full_version=target_python, python_version=".".join(target_python.split(".")[:2]))
    while extra := missing(out, environment):
        print(f"adding for Python {target_python}: {' '.join(extra)}")
        subprocess.run([*pip, "--no-deps", *extra], check=True)
    return sorted(p.name for p in out.glob("*.whl"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project_wheel", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--target-python", default="3.11.2", help="the server's Python (Debian 12: 3.11.2)")
    parser.add_argument("--torch-variant", choices=["cpu", "cuda"], default="cpu",
                        help="torch's CPU build, or its CUDA build for a server with a GPU")
    args = parser.parse_args(argv)
    wheels = build(args.project_wheel, args.out, args.target_python, args.torch_variant)
    print(f"{len(wheels)} wheels in {args.out}")


if __name__ == "__main__":
    main()
