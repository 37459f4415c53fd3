"""The kit that bench.gpu_validate needs on a GPU machine without network; standard library only.

    python3 -m bench.gpu_kit build --llamagen-src DIR [--out gpu-kit]    # make gpu-kit (needs network)
    python3 -m bench.gpu_kit unpack [--kit gpu-kit]                      # on the GPU machine

`build` downloads the Python 3.12 manylinux x86_64 wheels of the packages in bench/gpu_kit.txt at
the versions of requirements.lock, copies LlamaGen's model code from a checkout outside this
repository (never committed: the kit folder is ignored), and fails when the kit is over its size
limit (it travels beside the working tree; torch itself stays the GPU image's). `unpack` extracts
the wheels into KIT/site, skipping a package the machine's Python already has, so that
`PYTHONPATH=KIT/site python3 -m bench.gpu_validate` runs there without pip or network.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = os.path.join(REPO, "bench", "gpu_kit.txt")
LOCK = os.path.join(REPO, "requirements.lock")
# LlamaGen's files that its GPT, sampler and VQ model import (bench.vs_llamagen.import_llamagen).
LLAMAGEN_FILES = ("autoregressive/models/gpt.py", "autoregressive/models/generate.py", "utils/drop_path.py",
                  "tokenizer/tokenizer_image/vq_model.py")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
MAX_MB = 60.0


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def kit_packages(path: str = PACKAGES) -> list[str]:
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def pinned(packages: list[str], lock: str = LOCK) -> list[str]:
    """name==version of each package, from the lock; an error names any the lock lacks."""
    with open(lock) as f:
        versions = {norm(name): f"{name}=={version}" for name, _, version in
                    (ln.strip().partition("==") for ln in f) if version}
    missing = [p for p in packages if norm(p) not in versions]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not pinned in {lock}")
    return [versions[norm(p)] for p in packages]


def copy_llamagen(src: str, dest: str) -> list[str]:
    if os.path.realpath(src).startswith(os.path.realpath(REPO) + os.sep):
        raise SystemExit(f"{src} is inside this repository: LlamaGen's checkout must live outside it")
    missing = [f for f in LLAMAGEN_FILES if not os.path.isfile(os.path.join(src, f))]
    if missing:
        raise SystemExit(f"{src} is not a LlamaGen checkout: it lacks {', '.join(missing)}")
    for name in LLAMAGEN_FILES:
        os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
        shutil.copyfile(os.path.join(src, name), os.path.join(dest, name))
    return list(LLAMAGEN_FILES)


def size_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs) / 1e6


def build(llamagen_src: str, out: str, max_mb: float = MAX_MB) -> float:
    if os.path.exists(out):
        shutil.rmtree(out)
    wheels = os.path.join(out, "wheels")
    os.makedirs(wheels)
    pins = pinned(kit_packages())
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
                    "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", *platforms,
                    "-d", wheels, *pins], check=True)
    with open(os.path.join(out, "requirements.txt"), "w") as f:
        f.write("\n".join(pins) + "\n")
    copy_llamagen(llamagen_src, os.path.join(out, "llamagen"))
    total = size_mb(out)
    print(f"gpu kit: {out}, {total:.1f} MB ({len(os.listdir(wheels))} wheels, LlamaGen's model code)")
    if total > max_mb:
        raise SystemExit(f"the gpu kit is {total:.1f} MB, over its limit of {max_mb:g} MB")
    return total


def wheel_modules(wheel: str) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/", 1)[0] for n in z.namelist()}
    return {t.removesuffix(".py") for t in tops if not t.endswith((".dist-info", ".data")) and not t.endswith(".libs")}


def unpack(kit: str) -> list[str]:
    """Extract into KIT/site every wheel whose modules this Python does not already have."""
    site = os.path.join(kit, "site")
    os.makedirs(site, exist_ok=True)
    unpacked = []
    for name in sorted(os.listdir(os.path.join(kit, "wheels"))):
        wheel = os.path.join(kit, "wheels", name)
        modules = wheel_modules(wheel)
        present = [m for m in modules if importlib.util.find_spec(m) is not None
                   and not os.path.realpath(importlib.util.find_spec(m).origin or "").startswith(os.path.realpath(site))]
        if present:
            print(f"keeping this machine's {', '.join(sorted(present))}; not unpacking {name}")
            continue
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
        unpacked.append(name)
    print(f"unpacked {len(unpacked)} wheel(s) into {site}")
    return unpacked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download the wheels and copy LlamaGen's model code (needs network)")
    b.add_argument("--llamagen-src", default=os.environ.get("LLAMAGEN_SRC"), help="a LlamaGen checkout")
    b.add_argument("--out", default=os.path.join(REPO, "gpu-kit"))
    b.add_argument("--max-mb", type=float, default=MAX_MB)
    u = sub.add_parser("unpack", help="extract the wheels into KIT/site (no pip, no network)")
    u.add_argument("--kit", default=os.path.join(REPO, "gpu-kit"))
    args = parser.parse_args(argv)
    if args.command == "build":
        if not args.llamagen_src:
            raise SystemExit("give LlamaGen's checkout: LLAMAGEN_SRC=DIR (or --llamagen-src DIR)")
        build(args.llamagen_src, args.out, args.max_mb)
    else:
        unpack(args.kit)


if __name__ == "__main__":
    main()
