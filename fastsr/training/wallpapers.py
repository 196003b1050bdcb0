"""The default model's photographs: Debian's photographic wallpapers, reproducibly.

``python -m fastsr.training.wallpapers OUT`` (``make wallpaper-photos``) downloads five named
wallpaper packages with ``apt-get download`` (nothing is installed), unpacks them, keeps the
photographs listed in :data:`PHOTOS`, and writes

* ``OUT/train/*.png`` and ``OUT/val/*.png`` (the hold-out :data:`HELD_OUT`, chosen before training),
* ``OUT/manifest.csv``: file, split, source package and version, path in the package, licence
  (from the package's ``copyright`` file), original and written size, sha256 of the written file.

The selection rule, applied by looking at every picture of the five packages (95 distinct images):
keep a picture only if it is a photograph of a real scene (landscape, macro, water, flowers,
animals, architecture), and drop vector art, gradients, patterns, 3-D renders, paintings,
composited or blurred-light abstractions (the Ubuntu MATE aurora backgrounds, Infinite Sea,
Milky Way), and pictures with heavy JPEG artefacts. A package that ships one picture at several
sizes (Plasma's ``contents/images/WxH``) contributes its largest size once.

Photos are resized (Lanczos, antialiased) so the long side is at most :data:`MAX_SIDE` pixels: at
5-6K a DSLR wallpaper is mostly smooth bokeh per 96-pixel crop, at about 2K its crops carry detail
as densely as DIV2K's or the scikit-image photos do. The photos are training data only: nothing
of them ships in the wheel or the repository.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("plasma-workspace-wallpapers", "lomiri-wallpapers-20.04", "mate-backgrounds", "ukui-wallpapers",
            "gnome-backgrounds")
MAX_SIDE = 2048

# (package, path inside it under usr/share/) -> the name written. Checked by eye, see the module doc.
PHOTOS: dict[tuple[str, str], str] = {
    ("lomiri-wallpapers-20.04", "backgrounds/Kleiber_by_Lukas_Baubkus.jpg"): "kleiber",
    **{("mate-backgrounds", f"backgrounds/mate/nature/{n}.jpg"): n.lower() for n in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")},
    **{("plasma-workspace-wallpapers", f"wallpapers/{n}/contents/images"): n.lower() for n in (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
        "OneStandsOut", "Path", "summer_1am")},
}
# Chosen before training, one per package that contributes photos: never trained on.
HELD_OUT = ("kleiber", "ladybird", "eveningglow")


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    root: Path  # the unpacked data


def download(names: tuple[str, ...], into: Path) -> list[Package]:
    """``apt-get download`` each package into ``into`` and unpack it there (no install)."""
    subprocess.run(["apt-get", "download", *names], cwd=into, check=True, capture_output=True)
    packages = []
    for name in names:
        (deb,) = into.glob(f"{name}_*.deb")
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        root = into / name
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        packages.append(Package(name, version, root))
    return packages


def licence_of(package: Package, path: str) -> str:
    """The ``License:`` of the last machine-readable ``copyright`` stanza whose ``Files:`` matches ``path``."""
    text = (package.root / "usr/share/doc" / package.name / "copyright").read_text(errors="replace")
    licence = "unknown"
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():  # a field's value goes on in lines that start with a space
            if line.startswith((" ", "\t")) and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        patterns = fields.get("Files", "").split()
        if "License" in fields and any(_matches(path, p) for p in patterns):
            licence = fields["License"].split()[0]
    return licence


def _matches(path: str, pattern: str) -> bool:
    """A ``Files:`` pattern names upstream paths: match its tail, or its exact file name (a package
    may install ``20.04/x.jpg`` as ``backgrounds/x.jpg``)."""
    name = pattern.rsplit("/", 1)[-1]
    return fnmatch.fnmatch(path, "*" + pattern.lstrip("*")) or ("*" not in name and Path(path).name == name)


def largest_image(path: Path) -> Path:
    """The file itself, or a folder's largest picture (Plasma ships one picture at several sizes)."""
    if path.is_file():
        return path
    from PIL import Image

    sizes = {p: Image.open(p).size for p in path.iterdir() if p.suffix.lower() in (".jpg", ".png")}
    return max(sizes, key=lambda p: sizes[p][0] * sizes[p][1]).resolve()


def write_photo(src: Path, dst: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """Write ``src`` as an RGB PNG, long side at most MAX_SIDE; returns (original, written) sizes."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(src) as image:
        rgb = image.convert("RGB")
    original = rgb.size
    factor = MAX_SIDE / max(original)
    if factor < 1:
        rgb = rgb.resize((round(original[0] * factor), round(original[1] * factor)), Image.LANCZOS)
    rgb.save(dst)
    return original, rgb.size


def build(out: Path) -> Path:
    """Download, select, resize and write the set with its manifest; returns the manifest's path."""
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        packages = {p.name: p for p in download(PACKAGES, Path(tmp))}
        for (package_name, inside), name in sorted(PHOTOS.items(), key=lambda item: item[1]):
            package = packages[package_name]
            src = largest_image(package.root / "usr/share" / inside)
            split = "val" if name in HELD_OUT else "train"
            dst = out / split / f"{name}.png"
            original, written = write_photo(src, dst)
            rows.append({"file": f"{split}/{dst.name}", "split": split, "package": package.name,
                         "version": package.version, "path": str(src.relative_to(package.root)),
                         "licence": licence_of(package, str(src.relative_to(package.root / "usr/share"))),
                         "original_size": "x".join(map(str, original)), "size": "x".join(map(str, written)),
                         "sha256": hashlib.sha256(dst.read_bytes()).hexdigest()})
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastsr.training.wallpapers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for train/, val/ and manifest.csv")
    manifest = build(parser.parse_args(argv).out)
    print(f"wrote {sum(1 for _ in open(manifest)) - 1} photos and {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
