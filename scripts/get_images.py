#!/usr/bin/env python3
"""Gather the permissively licensed natural images that ship inside PyPI wheels into a training folder.

    python scripts/get_images.py data            # -> data/train/*.png|jpg, data/val/{monarch,barbara}.png

Each wheel is fetched with `pip download --no-deps` (nothing is installed) or read from --wheel-dir, every image is
checked against its pinned sha256, and the two Set14 members (monarch, barbara) are held out for validation.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# package==version -> [(path inside the wheel, sha256, licence as stated by its source)]
IMAGES = {
    "scikit-image==0.26.0": [
        ("skimage/data/astronaut.png", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
         "NASA, public domain"),
        ("skimage/data/chelsea.png", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
         "CC0 (Stefan van der Walt)"),
        ("skimage/data/coffee.png", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
         "CC0 (Rachel Michetti)"),
        ("skimage/data/rocket.jpg", "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
         "SpaceX, public domain"),
    ],
    "scikit-learn==1.9.1": [
        ("sklearn/datasets/images/china.jpg", "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29",
         "CC BY 2.0, danielbuechele"),
        ("sklearn/datasets/images/flower.jpg", "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638",
         "CC BY 2.0, vultilion"),
    ],
    "matplotlib==3.11.2": [
        ("matplotlib/mpl-data/sample_data/grace_hopper.jpg",
         "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130", "US Navy photograph, public domain"),
    ],
    "sporco==0.2.2.post1": [
        ("sporco/data/barbara.png", "61ce3bead097f17d7359b5466975b91938f5ba03822c3771707e42891576842b",
         "believed public domain or freely redistributable (sporco data README)"),
        ("sporco/data/kodim23.png", "34d8f029d2eae3ed37b65e2f94fd2c319923ebfae0fa8bff5f001e2565b7d80f",
         "Kodak, released for unrestricted use"),
        ("sporco/data/monarch.png", "c2435a5e37c04658824d26124ab27c3943e7b95b0eeeb27effa6439f81ff5ca9",
         "Waterloo BragZone, free of copyright restrictions"),
        ("sporco/data/sail.png", "7b8a3b23c79bf83b233915e2199c190589c40980d54d20eb3bf446a33c6e0461",
         "Waterloo BragZone, free of copyright restrictions"),
        ("sporco/data/tulips.png", "6f7fa671ce446f85c47fcda0ba9658f22b9824baf3c1abfae7051448665c37d1",
         "Waterloo BragZone, free of copyright restrictions"),
    ],
}
HELD_OUT = {"monarch.png", "barbara.png"}  # Set14 members: validation only


def find_wheel(spec: str, wheel_dir: Path) -> Path:
    name, version = spec.split("==")
    stem = name.replace("-", "_")
    hits = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    if hits:
        return hits[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", spec,
                    "-d", str(wheel_dir)], check=True)
    hits = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    if not hits:
        raise SystemExit(f"pip did not produce a wheel for {spec} in {wheel_dir}")
    return hits[0]


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output folder (train/ and val/ are created inside)")
    ap.add_argument("--wheel-dir", type=Path, default=None, help="folder with already downloaded wheels")
    args = ap.parse_args(argv)
    (args.out / "train").mkdir(parents=True, exist_ok=True)
    (args.out / "val").mkdir(parents=True, exist_ok=True)
    credits = []
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = args.wheel_dir or Path(tmp)
        for spec, files in IMAGES.items():
            with zipfile.ZipFile(find_wheel(spec, wheel_dir)) as wheel:
                for inner, sha, licence in files:
                    data = wheel.read(inner)
                    got = hashlib.sha256(data).hexdigest()
                    if got != sha:
                        raise SystemExit(f"{spec}:{inner}: sha256 {got} does not match the pinned {sha}")
                    name = Path(inner).name
                    split = "val" if name in HELD_OUT else "train"
                    write_atomic(args.out / split / name, data)
                    credits.append(f"{split}/{name}\t{spec}:{inner}\t{licence}")
    write_atomic(args.out / "SOURCES.tsv", ("\n".join(credits) + "\n").encode())
    n_val = sum(1 for c in credits if c.startswith("val/"))
    print(f"{len(credits) - n_val} training and {n_val} validation images in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
