"""Local Hugging Face datasets written in code, for the tests of `type: huggingface` datasets.

Every layout `datasets.load_dataset(<folder>)` reads is written from the same rows, so that one oracle judges them
all: photo-like JPEG and PNG images of a few sizes and aspect ratios (one JPEG rotated by its EXIF orientation),
string captions with blanks around them, an empty one and a missing one, a list-of-strings column, a fallback
caption column and (on request) width/height columns that disagree with the pixels, so a size can only have come
from them.

Layouts:
- `write_parquet`: parquet files under `data/`, several files of several row groups, the `image` column the
  `datasets` Image feature (struct of bytes/path) with the features in the schema's `huggingface` metadata, as
  `Dataset.to_parquet` and `push_to_hub` write it; `features_metadata=False` leaves that metadata out (a plain
  struct column, which `datasets` does not decode);
- `write_to_parquet`: one file written by `Dataset.to_parquet` itself;
- `write_arrow`: the Arrow stream file `Dataset.save_to_disk` writes, alone in a folder (the `arrow` builder);
- `write_saved`: the whole `save_to_disk` folder (state.json included), which `load_dataset` refuses.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Row:
    size: tuple[int, int]  # the stored pixels' (width, height)
    format: str = "JPEG"  # or "PNG"
    caption: str | None = "a photo"
    tags: list[str] | None = field(default_factory=lambda: ["photo"])
    alt: str | None = None  # the fallback caption column
    orientation: int | None = None  # EXIF orientation of a JPEG
    corrupt: bool = False  # bytes that are no image
    no_image: bool = False  # an empty (null) image cell
    no_width: bool = False  # an empty width cell (with size columns)
    description: str | None = None  # the `description` column, with `descriptions=True`


def rows() -> list[Row]:
    """Thirty rows: mixed sizes and formats, one EXIF-rotated JPEG, blank, empty and missing captions."""
    sizes = [(96, 64), (64, 96), (80, 80), (120, 48), (48, 120), (72, 56), (56, 72), (100, 60), (60, 100), (88, 88)]
    made = []
    for number in range(30):
        size = sizes[number % len(sizes)]
        made.append(Row(
            size=size,
            format="PNG" if number % 3 == 1 else "JPEG",
            caption=f"  photo number {number}, {size[0]}x{size[1]}  ",
            tags=[f" tag {number} ", "", "second tag", "  "],
            alt=f"alt text {number}",
        ))
    made[4] = Row(size=(96, 64), orientation=6, caption="rotated by its exif orientation", tags=["rotated"])
    made[7] = Row(size=(64, 48), caption="   ", tags=[], alt="a blank caption does not fall back")
    made[11] = Row(size=(72, 40), caption=None, tags=None, alt="the fallback caption")
    made[13] = Row(size=(40, 72), format="PNG", caption="", tags=["only tags"], alt=None)
    made[18] = Row(size=(50, 90), caption="tabs\tand\nnewlines inside é ü", tags=["ü"])
    return made


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth, textured RGB picture: gradients, waves and grain, so JPEG has something real to compress."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for channel in range(3):
        fx, fy, phase = rng.uniform(0.02, 0.2), rng.uniform(0.02, 0.2), rng.uniform(0, 6.28)
        wave = np.sin(x * fx + phase) * np.cos(y * fy) * 60
        gradient = (x / max(width - 1, 1)) * 90 + (y / max(height - 1, 1)) * 70 * (channel - 1)
        channels.append(128 + wave + gradient + rng.normal(0, 6, (height, width)))
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8), "RGB")


def encode(row: Row, seed: int) -> bytes:
    if row.corrupt:
        return b"\xff\xd8\xff\xe0 this is no image at all" + bytes(range(64))
    buffer = io.BytesIO()
    picture = photo(row.size, seed)
    if row.format == "PNG":
        picture.save(buffer, "PNG")
    else:
        exif = Image.Exif()
        if row.orientation is not None:
            exif[EXIF_ORIENTATION] = row.orientation
        picture.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def features(*, sizes: bool, descriptions: bool = False):
    import datasets

    described = {
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "tags": datasets.List(datasets.Value("string")),
        "alt": datasets.Value("string"),
    }
    if sizes:
        described |= {"width": datasets.Value("int32"), "height": datasets.Value("int32")}
    if descriptions:
        described["description"] = datasets.Value("string")
    return datasets.Features(described)


def column_data(table_rows: list[Row], *, sizes: bool, descriptions: bool = False) -> dict[str, list]:
    """The columns; with `sizes`, width/height columns twice the pixels' own (so a size taken from them shows)."""
    data = {
        "image": [None if row.no_image else {"bytes": encode(row, number), "path": None}
                  for number, row in enumerate(table_rows)],
        "caption": [row.caption for row in table_rows],
        "tags": [row.tags for row in table_rows],
        "alt": [row.alt for row in table_rows],
    }
    if sizes:
        data["width"] = [None if row.no_width else row.size[0] * 2 for row in table_rows]
        data["height"] = [row.size[1] * 2 for row in table_rows]
    if descriptions:
        data["description"] = [row.description for row in table_rows]
    return data


def write_parquet(folder: Path, table_rows: list[Row] | None = None, *, files: int = 3, row_group_size: int = 4,
                  sizes: bool = False, descriptions: bool = False, features_metadata: bool = True) -> Path:
    """`folder/data/train-0000k-of-0000n.parquet`, the rows split over `files` files in order."""
    table_rows = rows() if table_rows is None else table_rows
    data = column_data(table_rows, sizes=sizes, descriptions=descriptions)
    schema = features(sizes=sizes, descriptions=descriptions).arrow_schema
    if not features_metadata:
        schema = schema.remove_metadata()
    table = pa.Table.from_pydict(data, schema=schema)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(table_rows), files + 1).astype(int)
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        path = folder / "data" / f"train-{number:05d}-of-{files:05d}.parquet"
        pq.write_table(table.slice(start, stop - start), path, row_group_size=row_group_size)
    return folder


def dataset(table_rows: list[Row] | None = None, *, sizes: bool = False):
    import datasets

    table_rows = rows() if table_rows is None else table_rows
    return datasets.Dataset.from_dict(column_data(table_rows, sizes=sizes), features=features(sizes=sizes))


def write_to_parquet(folder: Path, table_rows: list[Row] | None = None, *, sizes: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dataset(table_rows, sizes=sizes).to_parquet(str(folder / "train.parquet"))
    return folder


def write_saved(folder: Path, table_rows: list[Row] | None = None, *, sizes: bool = False) -> Path:
    dataset(table_rows, sizes=sizes).save_to_disk(str(folder))
    return folder


def write_arrow(folder: Path, table_rows: list[Row] | None = None, *, sizes: bool = False) -> Path:
    """The Arrow stream file save_to_disk writes, without its state.json: what the `arrow` builder loads."""
    saved = write_saved(folder.parent / (folder.name + "-saved"), table_rows, sizes=sizes)
    folder.mkdir(parents=True, exist_ok=True)
    for arrow_file in sorted(saved.glob("*.arrow")):
        shutil.copy(arrow_file, folder / arrow_file.name)
    shutil.rmtree(saved)
    return folder


def features_json(folder: Path) -> dict:
    """The features a parquet file of `folder` declares (for tests that look at them)."""
    first = sorted(folder.rglob("*.parquet"))[0]
    return json.loads(pq.read_schema(first).metadata[b"huggingface"])
