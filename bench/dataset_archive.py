"""Dataset download benchmark: how long the server takes to make a dataset's tar archive
(app/dataset_export.py), whole and resumed from an offset, on a folder of images.

    .venv/bin/python bench/dataset_archive.py                       # animal-mnist
    .venv/bin/python bench/dataset_archive.py --data path/to/folder_or.zip

The archive is made as it is sent: a header per image and the images' bytes read from disk.
Its length (HEAD, a 304, where a resume's offset falls) is counted without making the
headers, so a download resumed with a `Range` makes the headers and reads the images after
its offset alone. Printed: seconds for the length (HEAD), the whole archive and a resume from
the middle and from the last kilobyte, each the best of --repeat, and the resumes' cost as a
share of the whole's. On the 2-core machine, animal-mnist (9,716 images, a 10.8 MB tar):
length 0.01 s, whole 0.35 s, from the middle 0.19 s, from the last kilobyte 0.02 s (when
each header was made to count the length: 0.24, 0.38, 0.31 and 0.25 s).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.dataset_export import Export, ExportedImage, archive, labels_csv, size  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ANIMAL_MNIST = PROJECT_ROOT.parent / "shared" / "datasets" / "animal-mnist.zip"


def export_of(folder: Path) -> Export:
    """An export of every file under `folder`, labeled by its parent folder's name."""
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    images = [ExportedImage(path.relative_to(folder).as_posix(), path, path.stat().st_size)
              for path in files]
    rows = [(image.path, image.file.parent.name, "train") for image in images]
    return Export(folder.name, labels_csv(rows), images)


def best_of(repeat: int, work) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ANIMAL_MNIST,
                        help="a folder of images, or a .zip of one (default: animal-mnist)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.data
        if folder.is_file():
            with zipfile.ZipFile(folder) as zipped:
                zipped.extractall(scratch)
            folder = Path(scratch)
        export = export_of(folder)
        length = size(export, mtime=0)

        def read(start: int = 0) -> None:
            assert sum(len(chunk) for chunk in archive(export, 0, start)) == length - start

        head = best_of(args.repeat, lambda: size(export, mtime=0))
        whole = best_of(args.repeat, read)
        middle = best_of(args.repeat, lambda: read(length // 2))
        end = best_of(args.repeat, lambda: read(length - 1024))
    print(f"{len(export.images):,} images, a {length / 1e6:.1f} MB tar")
    print(f"length (HEAD)          {head:6.2f} s")
    print(f"whole                  {whole:6.2f} s")
    print(f"from the middle        {middle:6.2f} s  ({middle / whole:.0%} of the whole's)")
    print(f"from the last KiB      {end:6.2f} s  ({end / whole:.0%} of the whole's)")


if __name__ == "__main__":
    main()
