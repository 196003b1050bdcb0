"""The default model's photo set: licences read from a package's machine-readable copyright file,
one size per picture, resized to at most MAX_SIDE (the download itself needs apt: `make wallpaper-photos`)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fastsr.training import wallpapers
from fastsr.training.wallpapers import Package

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
Copyright: someone
License: GPL-2+

Files: 20.04/Kleiber_by_Lukas_Baubkus.jpg
 20.04/Other_by_Someone.jpg
Copyright: 2021, Lukas Baubkus
License: CC-BY-SA-3.0

Files: nature/*.jpg
License: CC-BY-4.0
 The licence text goes on here.
"""


def test_licence_is_the_last_matching_stanza(tmp_path):
    package = Package("pkg", "1.0", tmp_path)
    doc = tmp_path / "usr/share/doc/pkg"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(COPYRIGHT)
    assert wallpapers.licence_of(package, "backgrounds/Kleiber_by_Lukas_Baubkus.jpg") == "CC-BY-SA-3.0"
    assert wallpapers.licence_of(package, "backgrounds/Other_by_Someone.jpg") == "CC-BY-SA-3.0"  # continued Files:
    assert wallpapers.licence_of(package, "backgrounds/nature/Aqua.jpg") == "CC-BY-4.0"
    assert wallpapers.licence_of(package, "backgrounds/abstract/Silk.png") == "GPL-2+"


def test_largest_size_is_kept_and_resized_to_max_side(tmp_path):
    sizes = tmp_path / "contents/images"
    sizes.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for w, h in ((300, 200), (3000, 1500), (120, 240)):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(sizes / f"{w}x{h}.png")
    src = wallpapers.largest_image(sizes)
    assert src.name == "3000x1500.png"
    original, written = wallpapers.write_photo(src, tmp_path / "out.png")
    assert original == (3000, 1500) and written == (wallpapers.MAX_SIDE, 1024)
    assert Image.open(tmp_path / "out.png").size == written


def test_the_hold_out_is_part_of_the_selection():
    assert set(wallpapers.HELD_OUT) <= set(wallpapers.PHOTOS.values())
    assert {p for p, _ in wallpapers.PHOTOS} <= set(wallpapers.PACKAGES)
