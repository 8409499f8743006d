"""Archives built to exhaust the web process: each is refused or skipped with bounded memory.

Found by a security review: bzip2 and xz tars and bzip2/LZMA zip entries expanded whole in
memory before any limit was checked, a tar's long-name header was read whole, a tar member
of an unknown type skipped the size limits, and a zip's end record could hide its entry
count. Peak memory is measured with tracemalloc (the decompressors' output is Python bytes).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app import ingest
from app.config import Settings
from app.ingest import IngestError, prepare_dataset

MiB = 1024**2
BOMB = 256 * MiB  # what each bomb expands to; the old code held all of it at once
BOUNDED = 40 * MiB  # peak allowed: the copy chunks, not the expanded size


def png(shade: int = 0) -> bytes:
    """A small PNG; each shade gives other bytes (identical images would be merged)."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, shade, 30)).save(out, "PNG")
    return out.getvalue()


def images(names: list[str]) -> list[tuple[tarfile.TarInfo, io.BytesIO]]:
    """Tar members: a different small PNG under each name."""
    contents = [png(shade) for shade in range(len(names))]
    return [(member(name, len(content)), io.BytesIO(content))
            for name, content in zip(names, contents, strict=True)]


def member(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info


def zeros(size: int):
    """A file-like object of `size` zero bytes, read in pieces (nothing that size is held)."""
    class Zeros(io.RawIOBase):
        left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            count = min(len(buffer), self.left)
            buffer[:count] = bytes(count)
            self.left -= count
            return count

    return io.BufferedReader(Zeros())


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, object]], compress) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w|", format=tarfile.GNU_FORMAT) as archive:
        for info, content in members:
            archive.addfile(info, content)
    path.write_bytes(compress(raw.getvalue()))
    return path


def peak_while(action) -> tuple[int, BaseException | None]:
    """Peak traced memory (bytes) while `action` runs, and what it raised."""
    tracemalloc.start()
    try:
        action()
        raised = None
    except IngestError as exc:
        raised = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, raised


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.mark.parametrize("compress", [bz2.compress, lzma.compress], ids=["bz2", "xz"])
def test_a_compressed_tar_bomb_is_refused_without_expanding_it(tmp_path, settings, compress):
    archive = write_tar(tmp_path / "bomb.tar", [(member("train/a/zeros.png", BOMB), zeros(BOMB))],
                        compress)
    assert archive.stat().st_size < 100_000

    peak, raised = peak_while(lambda: prepare_dataset(archive, tmp_path / "work", settings))

    assert raised is not None and raised.status_code == 413, raised
    assert "expands more than" in raised.detail or "larger than" in raised.detail
    assert peak < BOUNDED, f"{peak / MiB:.0f} MiB"


def test_a_tar_long_name_header_is_refused_before_it_is_read(tmp_path, settings):
    long_name = member("././@LongLink", BOMB, tarfile.GNUTYPE_LONGNAME)
    archive = write_tar(tmp_path / "long.tar.gz", [(long_name, zeros(BOMB))],
                        lambda data: gzip.compress(data, 1))

    peak, raised = peak_while(lambda: prepare_dataset(archive, tmp_path / "work", settings))

    assert raised is not None and raised.status_code == 413
    assert raised.detail.startswith("the tar archive has an extended header (a file name or "
                                    "pax record) of 256.0 MiB, over 1.0 MiB")
    assert peak < BOUNDED, f"{peak / MiB:.0f} MiB"


def test_a_tar_member_of_an_unknown_type_counts_against_the_limits(tmp_path, settings):
    """tarfile reads through the data of a member it does not know; its size counts."""
    odd = member("train/a/odd", BOMB, b"Z")
    archive = write_tar(tmp_path / "odd.tar.gz", [*images(["train/a/1.png"]), (odd, zeros(BOMB))],
                        lambda data: gzip.compress(data, 9))

    with pytest.raises(IngestError, match="expands more than 200 times") as caught:
        prepare_dataset(archive, tmp_path / "work", settings)
    assert caught.value.status_code == 413


def test_zip_entries_compressed_with_bzip2_or_lzma_are_skipped_named(tmp_path, settings):
    """zipfile would expand such an entry a whole read buffer at a time, whatever its
    declared size says (a 3 KB entry to gigabytes): they are skipped, never opened."""
    archive = tmp_path / "methods.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("a/1.png", png(1), zipfile.ZIP_DEFLATED)
        out.writestr("a/2.png", png(2), zipfile.ZIP_STORED)
        out.writestr("b/1.png", png(3), zipfile.ZIP_DEFLATED)
        out.writestr("b/2.png", png(4), zipfile.ZIP_DEFLATED)
        out.writestr("a/bzip2.png", png(5), zipfile.ZIP_BZIP2)
        out.writestr("b/lzma.png", png(6), zipfile.ZIP_LZMA)
    opened = []
    original = ingest._zip_opener

    def spy(archive, info):
        opener = original(archive, info)
        return lambda: opened.append(info.filename) or opener()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ingest, "_zip_opener", spy)
        prepared = prepare_dataset(archive, tmp_path / "work", settings)

    assert sorted(image.original_path for image in prepared.images) == [
        "a/1.png", "a/2.png", "b/1.png", "b/2.png"]
    assert sorted(opened) == ["a/1.png", "a/2.png", "b/1.png", "b/2.png"]
    reasons = {item.path: item.reason for item in prepared.skipped}
    assert reasons == {
        "a/bzip2.png": "compressed with bzip2, which uploads do not read: re-create the zip "
                       "with the usual deflate compression (zip -r, or Windows' Send to > "
                       "Compressed folder)",
        "b/lzma.png": "compressed with LZMA, which uploads do not read: re-create the zip "
                      "with the usual deflate compression (zip -r, or Windows' Send to > "
                      "Compressed folder)",
    }


def test_the_entry_count_is_checked_when_the_end_record_holds_the_signature_bytes(
    tmp_path, settings
):
    """The end record's directory offset is 0x06054B50, whose bytes read "PK\\x05\\x06":
    searching for the signature alone found those, read fields as a record and counted
    nothing, and zipfile then built an object per entry."""
    limited = settings.model_copy(update={"max_archive_files": 5})
    offset = 0x06054B50
    directory = b"".join(
        ingest.ZIP_DIRECTORY_ENTRY.pack(b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 5,
                                        0, 0, 0, 0, 0o100644 << 16, 0) + b"%05d" % i
        for i in range(20))
    end = ingest.ZIP_END.pack(b"PK\x05\x06", 0, 0, 20, 20, len(directory), offset, 0)
    archive = tmp_path / "hidden-count.zip"
    with open(archive, "wb") as out:
        out.seek(offset)  # sparse: 96 MiB of nothing before the directory
        out.write(directory + end)
    assert end[16:20] == b"PK\x05\x06"

    with pytest.raises(IngestError, match="more than 5 files") as caught:
        ingest._check_zip_entry_count(archive, limited)
    assert caught.value.status_code == 413


def test_a_skipped_file_keeps_a_path_of_bounded_length(tmp_path, settings):
    """A 63 MB dataset record came from 60 skipped files with 1 MiB names."""
    deep_name = "train/a/" + "/".join(["d" * 200] * 50) + "/notes.txt"  # 10,000+ characters
    archive = write_tar(tmp_path / "names.tar", [
        *images(["train/a/1.png", "train/b/1.png", "test/a/1.png", "test/b/1.png"]),
        (member(deep_name, 3), io.BytesIO(b"abc"))], lambda data: data)

    prepared = prepare_dataset(archive, tmp_path / "work", settings)

    (skipped,) = prepared.skipped
    assert skipped.path == deep_name[:1024]


def test_a_name_no_file_system_keeps_is_refused_and_quoted_in_part(tmp_path, settings):
    long_name = "train/" + "c" * 100_000 + "/1.png"
    archive = write_tar(tmp_path / "names.tar", [
        *images(["train/a/1.png", "train/b/1.png", long_name])], lambda data: data)

    with pytest.raises(IngestError) as caught:
        prepare_dataset(archive, tmp_path / "work", settings)

    detail = caught.value.detail
    assert detail.startswith("archive entry 'train/ccc")
    assert detail.endswith("\u2026 (100,012 characters) has a file or folder name of 100,000 "
                           "characters; no file system keeps more than 255: re-create the "
                           "archive from the files on disk")
    assert len(detail) < 500


@pytest.mark.parametrize("compress", [
    lambda data: gzip.compress(data) + gzip.compress(b""),
    lambda data: bz2.compress(data[:4096]) + bz2.compress(data[4096:]),
    lambda data: lzma.compress(data) + bytes(512),
], ids=["gzip-then-empty-member", "bzip2-two-streams", "xz-then-padding"])
def test_compressed_tars_of_several_streams_or_with_padding_still_read(tmp_path, settings,
                                                                        compress):
    archive = write_tar(tmp_path / "ok.tar",
                        images([f"train/{c}/{i}.png" for c in "ab" for i in range(3)]), compress)

    prepared = prepare_dataset(archive, tmp_path / "work", settings)

    assert len(prepared.images) == 6 and not prepared.skipped


def test_a_truncated_bzip2_tar_is_called_damaged(tmp_path, settings):
    noise = random.Random(0).randbytes(400_000)  # several of bzip2's 100 kB blocks
    whole = write_tar(tmp_path / "whole.tar.bz2", [
        *images(["train/a/1.png", "train/b/1.png"]),
        (member("train/a/noise.bin", len(noise)), io.BytesIO(noise))],
        lambda data: bz2.compress(data, 1))
    cut = tmp_path / "cut.tar.bz2"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    with pytest.raises(IngestError, match="damaged or truncated"):
        prepare_dataset(cut, tmp_path / "work", settings)
