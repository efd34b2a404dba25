"""Write the bundled Fashion-MNIST subset (PNG files in the ImageFolder layout) from the IDX files.

Source: the Debian package ``dataset-fashion-mnist`` (Zalando Research, MIT licence), which installs
``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

    python models/make_fashion_subset.py                      # models/fashion-mnist/{train,test}/<class>/*.png
    python models/make_fashion_subset.py --full-npz /tmp/fmnist   # also /tmp/fmnist/{train,test}.npz (all images)

The subset is the first ``--train-per-class`` / ``--test-per-class`` images of each class in file
order, so it is the same on every run.
"""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import click
import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parent / "fashion-mnist"

# Label order of the dataset; the numeric prefix makes sorted folder names match the labels.
CLASS_NAMES = (
    "0-tshirt",
    "1-trouser",
    "2-pullover",
    "3-dress",
    "4-coat",
    "5-sandal",
    "6-shirt",
    "7-sneaker",
    "8-bag",
    "9-ankle-boot",
)

_SPLITS = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format): magic, dimension sizes, then big-endian unsigned bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise click.ClickException(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = _SPLITS[split]
    images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if len(images) != len(labels):
        raise click.ClickException(f"{source}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def write_subset(images: np.ndarray, labels: np.ndarray, per_class: int, out: Path) -> int:
    if out.exists():
        shutil.rmtree(out)
    written = 0
    for label, name in enumerate(CLASS_NAMES):
        folder = out / name
        folder.mkdir(parents=True)
        for index in np.flatnonzero(labels == label)[:per_class]:
            # The file name keeps the index into the original IDX file, for traceability.
            Image.fromarray(images[index], mode="L").save(folder / f"{index:05d}.png", optimize=True)
            written += 1
    return written


@click.command()
@click.option("--source", type=click.Path(path_type=Path, file_okay=False), default=SOURCE, show_default=True)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=OUT, show_default=True)
@click.option("--train-per-class", type=click.IntRange(1), default=60, show_default=True)
@click.option("--test-per-class", type=click.IntRange(1), default=20, show_default=True)
@click.option(
    "--full-npz",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also write every image as DIR/train.npz and DIR/test.npz (arrays x [N,28,28] uint8, y int64).",
)
def main(source: Path, out: Path, train_per_class: int, test_per_class: int, full_npz: Path | None) -> None:
    """Write the Fashion-MNIST ImageFolder subset (and optionally the full sets as .npz)."""
    if not source.is_dir():
        raise click.ClickException(
            f"{source}: not found; install it with 'apt-get install dataset-fashion-mnist' or pass --source"
        )
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = read_split(source, split)
        count = write_subset(images, labels, per_class, out / split)
        click.echo(f"{out / split}: {count} images")
        if full_npz is not None:
            full_npz.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(full_npz / f"{split}.npz", x=images, y=labels)
            click.echo(f"{full_npz / f'{split}.npz'}: {len(images)} images")


if __name__ == "__main__":
    main()
