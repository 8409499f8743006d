"""Folder upload benchmark: how long the upload page takes to make a chosen folder into the tar
archive it sends (app/static/folder_tar.js), in Chromium, before a byte is sent.

    .venv/bin/python bench/folder_pack.py                 # in-memory files, 1,000 to 100,000
    .venv/bin/python bench/folder_pack.py --folder DIR    # and a folder on disk, as chosen

The archive is made of the files' names and sizes (Blob parts that point at the files), so
its cost is per file, not per byte; Chromium's own Blob bookkeeping is most of it. Reported:
milliseconds and microseconds a file, for files made in the page and, with --folder, for the
files of a folder on disk given to an <input webkitdirectory> (which cost more). On the 2-core
machine: about 150 µs a file made in the page (15 s at 100,000), 500 µs a file on disk
(animal-mnist's 9,716 files: 4.8 s).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = PROJECT_ROOT / "app" / "static" / "folder_tar.js"
CHROMIUM = "/usr/bin/chromium"

IN_MEMORY = """async (count) => {
    const entries = [];
    for (let i = 0; i < count; i += 1) {
        entries.push({ path: `photos/class${i % 50}/img_${i}.png`,
                       file: new File([new Uint8Array(300)], `img_${i}.png`) });
    }
    const began = performance.now();
    const blob = await window.folderTar.pack(entries);
    return { ms: performance.now() - began, bytes: blob.size };
}"""

CHOSEN = """async () => {
    const input = document.getElementById("folder");
    const entries = window.folderTar.filesChosen(input.files).files;
    const began = performance.now();
    const blob = await window.folderTar.pack(entries);
    return { ms: performance.now() - began, bytes: blob.size, files: entries.length };
}"""


def line(label: str, files: int, ms: float, size: int) -> str:
    return (f"{label:<28} {files:>8,} files  pack {ms:>8,.0f} ms  {1000 * ms / files:>6.1f} µs/file"
            f"  tar {size / 1024**2:>7.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--folder", type=Path, help="also pack this folder, chosen as a user does")
    args = parser.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--headless", "--no-sandbox"])
        page = browser.new_page()
        page.set_content('<input type="file" id="folder" webkitdirectory multiple>')
        page.add_script_tag(path=str(SCRIPT))
        for count in args.counts:
            result = page.evaluate(IN_MEMORY, count)
            print(line("files made in the page", count, result["ms"], result["bytes"]))
        if args.folder:
            # (Playwright's hand-over of the folder to the page is not timed: a person's
            # choice of it is not what it costs Playwright.)
            page.set_input_files("#folder", str(args.folder))
            result = page.evaluate(CHOSEN)
            print(line(f"{args.folder.name}/ on disk", result["files"], result["ms"],
                       result["bytes"]))
        browser.close()


if __name__ == "__main__":
    main()
