"""Ray's wheel and the dependencies the GPU machine's image lacks, in ``.whl/``, small enough to travel.

The GPU machine reaches no package index, and what travels with a call is at most 64 MiB; Ray's wheel is
79 MB. A headless worker needs neither the Java worker (``ray/jars/ray_dist.jar``, 32 MB) nor the dashboard's
web client (``ray/dashboard/client``), so this writes the wheel without them (~44 MB; ``RECORD`` rewritten to
match). Ray's other needs are in the image except jsonschema and its own dependencies, fetched here too.

    python benchmarks/ray_wheels.py                 # here, then on the GPU machine (carry .whl; Python 3.12):
    python -m pip install --no-deps --no-index --target /tmp/raypkgs .whl/ray-*.whl .whl/jsonschema*.whl \\
        .whl/referencing-*.whl .whl/rpds_py-*.whl && PYTHONPATH=src:/tmp/raypkgs python benchmarks/scaling.py --gpus 2

Checked on a fresh Python 3.12 venv: the line installs offline, and Ray starts a local cluster and runs a task
from ``--target`` (its workers inherit ``PYTHONPATH``) once Ray's common dependencies are there (msgpack,
click, filelock, protobuf, pyyaml, requests, attrs: in the GPU image, not in a bare venv).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRIP = ("ray/jars/", "ray/dashboard/client/")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
EXTRA = ["jsonschema==4.25.1", "jsonschema-specifications==2025.9.1", "referencing==0.36.2", "rpds-py==0.27.1"]


def download(dest: Path, spec: str, python: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), spec]
    subprocess.run(cmd, check=True)


def strip(wheel: Path) -> Path:
    """The wheel without ``STRIP``'s folders, in place of the original."""
    out = wheel.with_suffix(".stripped")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(STRIP):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                gone = tuple(s.encode() for s in STRIP)
                data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(gone))
            dst.writestr(item, data)
    out.replace(wheel)
    return wheel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ray", default="2.60.0")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python")
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    args = parser.parse_args()
    args.dest.mkdir(exist_ok=True)
    download(args.dest, f"ray=={args.ray}", args.python)
    for spec in EXTRA:
        download(args.dest, spec, args.python)
    wheel = next(args.dest.glob(f"ray-{args.ray}-cp{args.python.replace('.', '')}-*.whl"))
    before = wheel.stat().st_size
    strip(wheel)
    print(f"{wheel.name}: {before / 1e6:.1f} MB -> {wheel.stat().st_size / 1e6:.1f} MB (without {', '.join(STRIP)})")


if __name__ == "__main__":
    main()
