"""Wheels that benchmarks/ray_serving.py needs on the GPU machine and its image lacks, in one folder under the
carry limit (the machine has no network: Python 3.12, jax 0.11.2, no Ray, FastAPI, Uvicorn, Starlette,
pydantic, jsonschema or google-re2).

    python benchmarks/ray_carry.py /work/main/.raywhl      # downloads (PyPI), slims Ray, writes MANIFEST

Ray's wheel is 76 MiB; Serve needs none of its Java jars (31 MiB), the dashboard's web client build or RLlib,
so those are left out of a repacked wheel (its RECORD rewritten to match). What stays imports and runs a Serve
app: check it with a cp312 interpreter (the docstring of ray_serving.py has the install line).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

RAY = "ray==2.60.0"
# Pure-Python or cp312 manylinux wheels, pinned to what the tests run with here.
DEPS = ["fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.54.0", "pydantic==2.13.4", "pydantic-core==2.46.4",
        "annotated-types==0.8.0", "typing-inspection==0.4.5", "jsonschema==4.26.0",
        "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1",
        "google-re2==1.1.20251105", "colorful==0.5.8", "aiohttp-cors==0.8.1", "smart-open==9.0.2",
        "watchfiles==1.3.0", "opentelemetry-api==1.45.2", "typing-extensions==4.16.0",
        "grpcio-reflection==1.84.0"]  # the GPU image has grpcio 1.84.0; reflection must not be newer
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "any"]
# Parts of Ray's wheel that Serve never loads.
DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/")
LIMIT_MIB = 60


def download(spec: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(out), spec]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd, check=True)


def slim(wheel: Path) -> Path:
    """``wheel`` without the DROP folders, RECORD rewritten; replaces the file, returns its path."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in src.infolist():
            if info.filename.startswith(DROP) or info.filename == record_name:
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{info.filename},sha256={digest},{len(data)}")
        rows.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(rows) + "\n")
    tmp.replace(wheel)
    return wheel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for the wheels (made if missing)")
    out = Path(p.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in [RAY, *DEPS]:
        download(spec, out)
    ray_wheel = next(out.glob("ray-2.60.0-cp312-*.whl"))
    slim(ray_wheel)
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    lines = [f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}" for w in wheels]
    lines.append(f"{total / 2**20:7.2f} MiB  total (limit {LIMIT_MIB}); {ray_wheel.name} without {', '.join(DROP)}")
    (out / "MANIFEST").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if total > LIMIT_MIB * 2**20:
        print(f"over {LIMIT_MIB} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
