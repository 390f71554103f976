"""WebDataset-style `.tar` shards and the webshart indexes that make them a `type: webshart` dataset, written in code.

Images are photo-like (smooth gradients, a few soft shapes, sensor noise), JPEG, PNG and WebP, a few sizes and aspect
ratios; one JPEG carries an EXIF orientation (stored landscape, shown portrait). Captions sit where real webdatasets
keep them: `.json` sidecars (`caption`, `text`, `tags`), `.txt` sidecars, captions written into the index, a JSON
object as a caption, and a top-level `.txt` that SimpleTuner's name lookup pairs with an image in a subfolder.

Two kinds of index, as datasets come:
- `webshart.MetadataExtractor(include_image_geometry=True)`: what `webshart extract-metadata` writes (a map of
  members, sizes read from the image headers, JSON sidecar captions attached);
- written here (`write_index`): the same fields by hand, as a list or a map, with captions and custom fields a
  dataset author adds, and sizes from Pillow (stored pixels, no EXIF rotation, as the extractor reads them).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# EXIF tag 0x0112: 6 = rotate 90° clockwise to display.
ORIENTATION = 0x0112


def photo(size: tuple[int, int], seed: int, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    """An encoded photo-like image of `size` (W, H): a sky-to-ground gradient, two soft blobs, noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    top, bottom = rng.uniform(40, 220, 3), rng.uniform(20, 200, 3)
    t = (y / max(height - 1, 1))[..., None]
    pixels = top * (1 - t) + bottom * t
    for _ in range(2):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, max(width, height) / 2)
        blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r)))[..., None]
        pixels = pixels * (1 - blob) + rng.uniform(0, 255, 3) * blob
    pixels += rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    out = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        image.save(out, fmt, exif=exif, quality=90)
    else:
        image.save(out, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return out.getvalue()


@dataclass
class Shard:
    """One shard: its members in tar order (name -> bytes), and index fields to add per member (hand-written
    indexes only)."""

    name: str  # relative to the dataset folder, without .tar ("shard-000", "more/shard-003")
    members: dict[str, bytes]
    index_fields: dict[str, dict] = field(default_factory=dict)


def write_tar(path: Path, members: dict[str, bytes]) -> dict[str, tuple[int, int]]:
    """Writes the members (GNU tar, as `tar` and webdataset writers do) and returns name -> (offset, length) of each
    member's bytes in the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            archive.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as archive:
        return {member.name: (member.offset_data, member.size) for member in archive.getmembers() if member.isfile()}


def image_size(data: bytes) -> tuple[int, int] | None:
    """The stored size (no EXIF rotation), None for bytes that are not an image, as the extractor records it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001 - any undecodable member simply has no geometry
        return None


def write_index(shard: Shard, folder: Path, layout: str = "map") -> Path:
    """A hand-written index next to the shard's tar: every member with offset, length and (for images) width, height
    and aspect, plus `shard.index_fields`; `layout` "map" (files keyed by name, with the filesize webshart requires
    of that layout) or "list"."""
    offsets = write_tar(folder / f"{shard.name}.tar", shard.members)
    files = []
    for name, (offset, length) in offsets.items():
        entry = {"path": name, "offset": offset, "length": length}
        size = image_size(shard.members[name]) if not name.endswith((".json", ".txt")) else None
        if size is not None:
            entry |= {"width": size[0], "height": size[1], "aspect": size[0] / size[1]}
        files.append(entry | shard.index_fields.get(name, {}))
    tar = folder / f"{shard.name}.tar"
    if layout == "map":
        document = {"path": tar.name, "filesize": tar.stat().st_size, "includes_image_geometry": True,
                    "files": {entry["path"]: entry for entry in files}}
    else:
        document = {"files": files}
    index = folder / f"{shard.name}.json"
    index.write_text(json.dumps(document))
    return index


def index_with_webshart(folder: Path) -> None:
    """Indexes every `.tar` directly in `folder` with webshart's own extractor (JSON written beside each tar)."""
    import webshart

    webshart.MetadataExtractor().extract_metadata(source=str(folder), destination=str(folder) + "/",
                                                  include_image_geometry=True)


def photo_shards(folder: Path) -> list[Shard]:
    """A dataset of three indexed shards and one tar without an index (webshart's discovery leaves it out):

    - shard-000 (webshart's extractor): JSON sidecar captions (a string, a list, `text`), a JPEG stored 80x48 with
      EXIF orientation 6, an image with a paired `.txt` only, one with no caption at all, a PNG that is not an
      image (no geometry), a lone `notes.txt`, and `sub/sky.jpg` whose caption SimpleTuner finds in the top-level
      `sky.txt`;
    - shard-001 (webshart's extractor): twelve JPEG/PNG/WebP photos of six aspect ratios with JSON sidecars that
      also carry `tags`;
    - shard-002 (written here, list layout): captions in the index (padded, a list with blanks, a JSON object,
      blank, an empty list), a custom `tags` field, JSON sidecars whose contents the index does not hold (one of
      them `.JSON`), an upper-case `.JPG` paired with an `.TXT`, and names whose byte order is not their
      case-blind order (`Zebra.png` before `apple.jpg`, `été.jpg` last);
    - shard-003.tar: no index.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sidecar = lambda **fields: json.dumps(fields).encode()  # noqa: E731
    first = Shard("shard-000", {
        "000.jpg": photo((64, 48), 0),
        "000.json": sidecar(caption="a red barn under a pale sky"),
        "001.png": photo((48, 64), 1, "PNG"),
        "001.json": sidecar(caption=["two captions, first", "  two captions, second  "], tags="portrait"),
        "002.jpg": photo((80, 48), 2, orientation=6),
        "002.json": sidecar(text="a rotated harbour"),
        "003.jpg": photo((72, 48), 3),
        "003.txt": b"a caption in a paired text file\n",
        "004.jpg": photo((56, 56), 4),
        "005.png": b"\x89PNG not really",
        "005.json": sidecar(caption="no pixels here"),
        "notes.txt": b"a lone text member",
        "sub/sky.jpg": photo((96, 32), 5),
        "sky.txt": b"  a wide evening sky \n",
    })
    sizes = [(64, 48), (48, 64), (64, 64), (96, 48), (48, 96), (80, 56)]
    second = Shard("shard-001", {})
    for number in range(12):
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][number % 3]
        stem = f"{100 + number:03d}"
        second.members[f"{stem}.{ext}"] = photo(sizes[number % len(sizes)], 100 + number, fmt)
        second.members[f"{stem}.json"] = sidecar(caption=f"photo number {number}", tags=[f"tag{number}", "outdoor"])
    for shard in (first, second):
        write_tar(folder / f"{shard.name}.tar", shard.members)
    index_with_webshart(folder)

    third = Shard("shard-002", {
        "200.jpg": photo((64, 40), 200),
        "201.png": photo((40, 64), 201, "PNG"),
        "202.jpg": photo((64, 64), 202),
        "203.jpg": photo((88, 48), 203),
        "204.jpg": photo((48, 48), 204),
        "205.jpg": photo((60, 45), 205),
        "206.jpg": photo((45, 60), 206),
        "206.json": sidecar(caption="from the sidecar itself", tags="sidecar tag"),
        "207.JPG": photo((64, 48), 207),
        "207.TXT": b"upper-case pair",
        "208.jpg": photo((72, 56), 208),
        "208.JSON": sidecar(caption="an upper-case JSON sidecar"),
        "apple.jpg": photo((64, 48), 209),
        "Zebra.png": photo((48, 64), 210, "PNG"),
        "\u00e9t\u00e9.jpg": photo((56, 64), 211),
    }, index_fields={
        "apple.jpg": {"captions": "sorted after Zebra: upper case first"},
        "Zebra.png": {"captions": "sorted before apple"},
        "\u00e9t\u00e9.jpg": {"captions": "a non-ASCII name, sorted last"},
        "200.jpg": {"captions": "   padded caption\t ", "tags": ["  first tag ", "second tag"]},
        "201.png": {"captions": ["one", "  ", "two "], "tags": "only tag"},
        "202.jpg": {"captions": {"subject": "a kettle", "style": ["photo", "café"]}},
        "203.jpg": {"captions": "   "},
        "204.jpg": {"captions": []},
        "205.jpg": {"caption": "singular key"},
    })
    write_index(third, folder, layout="list")
    write_tar(folder / "shard-003.tar", {"300.jpg": photo((64, 48), 300), "300.json": sidecar(caption="unindexed")})
    return [first, second, third]
