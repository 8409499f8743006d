"""Dataset ingestion: receive an uploaded archive, read it safely, verify its images, lay them
out and publish them all-or-nothing (plus thumbnails, deletion and crash clean-up)."""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import tarfile
import threading
import time
import unicodedata
import uuid
import weakref
import zipfile
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, NamedTuple

import anyio.to_thread
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import Settings
from app.experiments import delete_run_rows, run_folders, untested_classes, weights_in_use
from app.models import Dataset, DatasetImage, Experiment, Run
from app.responses import human_bytes, shortened
from app.schemas import CONTROL_CHARACTERS, TO_GO_STATUSES
from app.trash import move_to_trash, trash_dir
from worker.selftuning.budgets import split_holdout
from worker.selftuning.data import (
    TAR_CUT_SHORT,
    UNLABELED_IN_TEST,
    TarInfoSeeingTheEnd,
    tar_end_read,
    zip_entry_name,
)
from worker.selftuning.files import remove_abandoned_temporaries
from worker.selftuning.labels_csv import (
    BLANK_CLASS_FOLDER,
    LABELS_CSV,
    SPLITS,
    UNLABELED_FOLDER,
    LabelsRow,
    class_name,
    class_name_warnings,
    classes_phrase,
    folder_disagreements,
    header_hint,
    lost_class_warnings,
    natural_key,
    parse_labels_csv,
    quoted_list,
    skip_reason_by_name,
    spaced_path,
    untested_class_warnings,
)
from worker.selftuning.pixels import (
    IMAGE_SUFFIXES,
    SNIFF_BYTES,
    SUPPORTED_TEXT,
    WHITE_LEVELS,
    brightest_value,
    looks_like_image,
    to_rgb,
    white_level_for,
    white_level_of,
)

log = logging.getLogger(__name__)

# Uploads are held to SELFTUNE_MAX_IMAGE_PIXELS by `_check_pixels`, on the header before any
# decoding. Pillow's own limit is process-wide and would also refuse the thumbnail of an image
# accepted before the setting was lowered (and, above 179 M pixels, the workers' decoding of
# one accepted under a higher setting): it is off in each process that imports this module.
Image.MAX_IMAGE_PIXELS = None
# Registers every plugin now: `Image.open(formats=...)` only knows those already loaded.
Image.init()

# Pillow format name -> extension of the stored original bytes (MPO: camera JPEGs).
STORED_FORMATS = {
    "JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif",
    "GIF": "gif",
}
# What Image.open may try (MPO files are found by the JPEG opener).
OPEN_FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"]
NOT_UTF8_REASON = "file or folder name is not valid UTF-8: rename it"
MAX_LABELS_CSV_BYTES = 64 * 1024**2
# Skipped files a dataset keeps by name (with the reason); all are counted. 199,000 kept made
# every upload answer 47 MB and every dataset listing 50 times slower.
MAX_SKIPPED_KEPT = 1000
# A path as stored (an image's original path, a skipped file's) and as quoted in a refusal.
MAX_PATH_CHARS = 1024
MAX_QUOTED_CHARS = 300
# One file or folder name (a class name among them): what ext4, NTFS and APFS allow.
MAX_NAME_CHARS = 255
# Tar's extended headers (a long name, pax records) are read whole into memory by tarfile.
MAX_TAR_HEADER_BYTES = 1024**2
# Multipart framing and the small `name` field on top of the archive itself.
MULTIPART_OVERHEAD_BYTES = 1024**2
# After a 413 the rest of the body is read and dropped, up to this much, so that clients
# see the response instead of a reset connection.
DRAIN_BYTES = 64 * 1024**2
WRITE_BUFFER_BYTES = 1024**2
COPY_CHUNK_BYTES = 1024**2
THUMBNAIL_SIZE = 128
PREVIEW_SIZE = 512  # a thumbnail large enough to tell what an image shows, to label it


class UploadAbandoned(Exception):
    """The client went away while its upload was being verified: nothing is kept."""


def _check_wanted(abandoned: threading.Event | None) -> None:
    if abandoned is not None and abandoned.is_set():
        raise UploadAbandoned


class IngestError(Exception):
    """An upload we refuse; `detail` tells the user what to fix."""

    def __init__(self, detail: str, status_code: int = 422) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status_code


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str

    def __post_init__(self) -> None:  # kept and shown: a name of megabytes is cut
        object.__setattr__(self, "path", self.path[:MAX_PATH_CHARS])


# --- Receiving the upload -------------------------------------------------------------------


@dataclass(frozen=True)
class UploadOf:
    """What a multipart upload carries in its `file` field, as its refusals name it."""

    what: str  # "archive"
    example: str  # the file in the curl example: "photos.zip"
    too_large_hint: str  # what to do about a file over the limit


ARCHIVE = UploadOf("archive", "photos.zip",
                   "split it into smaller archives or raise SELFTUNE_MAX_UPLOAD_BYTES")


@dataclass
class ReceivedUpload:
    """The archive streamed to disk from a multipart request, and the form's other field."""

    path: Path
    filename: str
    name: str | None
    size: int


class MultipartParts:
    """A form read as a stream (`write` each chunk, then `finalize`) through python-multipart,
    its framing errors a 400: each part's Content-Disposition is gathered and its options
    (`name`, `filename`) handed to `on_part` once its headers are read; a subclass takes its
    parts (`on_part_begin`, `on_part_data`, `on_part_end`). A field it does not name in
    FIELDS is a 422: a misspelt `-F nmae=cats` was dropped, the dataset named after the file."""

    FIELDS: tuple[str, ...] = ()

    def __init__(self, boundary: bytes) -> None:
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._ended = False  # the closing boundary read (`--boundary--`)
        self._parser = MultipartParser(boundary, self.callbacks())

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except IngestError:
            raise
        except Exception as exc:  # python-multipart raises several types on bad framing
            raise IngestError(f"the multipart body is malformed: {exc}", 400) from None

    def finalize(self) -> None:
        """The body has ended: a 400 unless its closing boundary came. python-multipart's own
        finalize checks nothing, and a body cut short between two writes of the file (a
        client that died, a `tar | curl` whose tar did) was taken as the whole file."""
        try:
            self._parser.finalize()
        except Exception as exc:  # noqa: BLE001 - a truncated body is the client's problem
            raise IngestError(f"the multipart body is incomplete: {exc}", 400) from None
        if not self._ended:
            raise IngestError("the multipart body is incomplete: it ends before the form's "
                              "closing boundary (cut short?): send it again", 400)

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_end(self) -> None:
        self._ended = True

    def on_part_begin(self) -> None:
        pass

    def on_part(self, options: dict[bytes, bytes]) -> None:
        pass

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        pass

    def on_part_end(self) -> None:
        pass

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._disposition = b""
        field = options.get(b"name", b"").decode("utf-8", "replace")
        if field not in self.FIELDS:
            raise IngestError(f"the form has a field {quoted(field)}, which this request does "
                              f"not take: {self.fields_hint()}")
        self.on_part(options)

    def fields_hint(self) -> str:
        """What to send in which field, for a refusal of a field not in FIELDS."""
        return f"its fields are {' and '.join(repr(name) for name in self.FIELDS)}"


class _MultipartSink(MultipartParts):
    """The `file` part goes to a buffer flushed to disk by the caller, the `name` part is kept
    (small)."""

    FIELDS = ("file", "name")
    MAX_FIELD_BYTES = 64 * 1024

    def __init__(self, boundary: bytes, max_file_bytes: int, upload: UploadOf = ARCHIVE) -> None:
        super().__init__(boundary)
        self.max_file_bytes = max_file_bytes
        self.upload = upload
        self.pending = bytearray()
        self.file_bytes = 0
        self.too_large = False
        self.filename: str | None = None
        self.file_parts = 0
        self.name: str | None = None
        self._target: str | None = None
        self._field = bytearray()

    def fields_hint(self) -> str:
        return (f"send the {self.upload.what} in a field named 'file' and, if you like, its "
                f"name in one named 'name' (curl -F file=@{self.upload.example} -F name=...)")

    def on_part_begin(self) -> None:
        self._target = None
        self._field = bytearray()

    def on_part(self, options: dict[bytes, bytes]) -> None:
        field_name = options.get(b"name", b"").decode("utf-8", "replace")
        if field_name == "file":
            # Without a filename too: `curl -F 'file=<photos.zip'` sends the bytes without one
            # (the archive is recognised by its content; the dataset name falls back then).
            self.file_parts += 1
            if self.file_parts > 1:
                raise IngestError(f"send one {self.upload.what} per upload (the form has "
                                  "several 'file's)")
            raw_filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.filename = PurePosixPath(raw_filename.replace("\\", "/")).name
            self._target = "file"
        else:
            self._target = "name"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target == "file":
            self.file_bytes += end - start
            if self.file_bytes > self.max_file_bytes:
                self.too_large = True
            elif not self.too_large:
                self.pending += data[start:end]
        elif self._target == "name":
            self._field += data[start:end]
            if len(self._field) > self.MAX_FIELD_BYTES:
                raise IngestError("the 'name' field is too long (at most 200 characters)")

    def on_part_end(self) -> None:
        if self._target == "name":
            try:
                self.name = self._field.decode("utf-8")
            except UnicodeDecodeError:  # kept as U+FFFD before, the name silently changed
                raise IngestError("the 'name' field is not UTF-8 text: send the name in UTF-8 "
                                  "(browsers and curl do)") from None


async def _drain(chunks: AsyncIterator[bytes], already: int = 0) -> None:
    drained = already
    async for chunk in chunks:
        drained += len(chunk)
        if drained > DRAIN_BYTES:
            return


def _too_large(max_bytes: int, upload: UploadOf) -> IngestError:
    return IngestError(
        f"the {upload.what} is larger than the upload limit of {human_bytes(max_bytes)}: "
        f"{upload.too_large_hint}",
        status_code=413,
    )


async def receive_upload(
    headers: Mapping[str, str], chunks: AsyncIterator[bytes], destination: Path, max_bytes: int,
    upload: UploadOf = ARCHIVE,
) -> ReceivedUpload:
    """Stream a multipart/form-data body (`file`, optional `name`) to `destination`, never
    holding the file in memory and refusing it (413) as soon as it passes `max_bytes`."""
    content_type = headers.get("content-type", "")
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data" or b"boundary" not in params:
        raise IngestError(
            f"send the {upload.what} as multipart/form-data in a field named 'file' "
            f"(curl -F file=@{upload.example} ...)",
            status_code=415,
        )
    max_body = max_bytes + MULTIPART_OVERHEAD_BYTES
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        await _drain(chunks)
        raise _too_large(max_bytes, upload)

    sink = _MultipartSink(params[b"boundary"], max_bytes, upload)
    body_bytes = 0
    with open(destination, "wb") as out:
        async for chunk in chunks:
            body_bytes += len(chunk)
            sink.write(chunk)
            if sink.too_large or body_bytes > max_body:
                await _drain(chunks, body_bytes)
                raise _too_large(max_bytes, upload)
            if len(sink.pending) >= WRITE_BUFFER_BYTES:
                data, sink.pending = bytes(sink.pending), bytearray()
                await anyio.to_thread.run_sync(out.write, data)
        sink.finalize()
        if sink.pending:
            await anyio.to_thread.run_sync(out.write, bytes(sink.pending))
    if sink.filename is None:
        raise IngestError(
            f"no {upload.what} in the form: send it in a multipart field named 'file' "
            f"(curl -F file=@{upload.example} ...)"
        )
    return ReceivedUpload(destination, sink.filename, sink.name, sink.file_bytes)


def dataset_warnings(session: Session, dataset: Dataset) -> list[str]:
    """What was stored but looks like a mistake: class names that differ only in letter case
    (`class_name_warnings`), what its upload looked wrong in (`Dataset.upload_warnings`),
    classes the uploaded test split leaves out (`untested_class_warnings`), and the same
    images, labels and splits as another dataset (an upload sent twice: its runs would
    compare nothing new and its images take the space again)."""
    twins = session.execute(
        select(Dataset.id, Dataset.name).where(Dataset.fingerprint == dataset.fingerprint,
                                               Dataset.id != dataset.id)
        .order_by(Dataset.id).limit(4)
    ).all()
    same = [] if not twins else [
        f"the same images, labels and splits as dataset "
        f"{', '.join(f'{twin.id} ({twin.name!r})' for twin in twins[:3])}"
        f"{' and others' if len(twins) > 3 else ''}: delete one of them if it was uploaded "
        "twice by mistake"]
    return (class_name_warnings(dataset.class_names) + list(dataset.upload_warnings)
            + untested_class_warnings(untested_classes(dataset)) + same)


def dataset_name(requested: str | None, filename: str) -> str:
    """The name given in the form, else the archive's file name without its suffixes;
    composed (NFC) as class names are, so its length counts what a person sees."""
    name = (requested or "").strip()
    if CONTROL_CHARACTERS.search(name):
        raise IngestError("the dataset name must not contain control characters (NUL, tab, "
                          "line breaks)")
    typed = bool(name)
    if not typed:
        name = re.sub(r"(\.(zip|tar|tgz|tbz2?|txz|gz|bz2|xz))+$", "", filename, flags=re.I)
        name = CONTROL_CHARACTERS.sub(" ", name).strip() or "dataset"
    name = unicodedata.normalize("NFC", name)
    if len(name) > 200 and not typed:  # a name nobody typed is shortened, not refused
        name = shortened(name, 200)
    if len(name) > 200:
        raise IngestError("the dataset name is too long (at most 200 characters)")
    return name


# --- Reading archives -----------------------------------------------------------------------


def quoted(name: str) -> str:
    """A name as a refusal quotes it: repr, cut after MAX_QUOTED_CHARS characters."""
    if len(name) > MAX_QUOTED_CHARS:
        return f"{name[:MAX_QUOTED_CHARS]!r}\u2026 ({len(name):,} characters)"
    return repr(name)


def safe_member_path(raw: str) -> str:
    """The archive path as clean relative components; refuses anything that could escape."""
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise IngestError(f"archive entry {quoted(raw)} has a NUL byte in its name")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise IngestError(
            f"archive entry {quoted(raw)} has an absolute path: re-create the archive with "
            "relative paths (from inside the folder you are uploading)"
        )
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise IngestError(
            f"archive entry {quoted(raw)} points outside the archive ('..'): re-create the "
            "archive without '..' in its paths"
        )
    if (longest := max((len(part) for part in parts), default=0)) > MAX_NAME_CHARS:
        raise IngestError(
            f"archive entry {quoted(raw)} has a file or folder name of {longest:,} characters; "
            f"no file system keeps more than {MAX_NAME_CHARS}: re-create the archive from "
            "the files on disk"
        )
    return "/".join(parts)


def is_utf8_name(path: str) -> bool:
    """False for a name that was not valid UTF-8 in the archive: tarfile keeps such bytes as
    lone surrogates (surrogateescape), which no database, JSON or page can hold."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_name(path: str) -> str:
    """The name as valid text, each undecodable byte shown as U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _link_error(raw: str) -> IngestError:
    return IngestError(
        f"archive entry {quoted(raw)} is a link: links are not accepted, archive the files "
        "themselves (zip: leave out --symlinks; tar: add --dereference --hard-dereference)"
    )


@dataclass
class _Member:
    """One archive entry after the structural checks."""

    path: str
    kind: str  # file | dir | other | encrypted | compression (one that is not read)
    size: int
    open: Callable[[], IO[bytes]]
    compression: int = 0  # a zip entry's method


class _ByteBudget:
    """Counts the bytes actually extracted and stops at the uncompressed or ratio limit
    (declared sizes are checked first, but an archive can lie about them)."""

    def __init__(self, settings: Settings, archive_size: int) -> None:
        self.limit = min(
            settings.max_uncompressed_bytes,
            int(settings.max_compression_ratio * max(archive_size, 1)),
        )
        self.settings = settings
        self.archive_size = archive_size
        self.used = 0

    def check_declared(self, declared_total: int) -> None:
        _check_expansion(declared_total, self.archive_size, self.settings)

    def consume(self, count: int) -> None:
        self.used += count
        if self.used > self.limit:
            _check_expansion(self.used, self.archive_size, self.settings)


def _check_expansion(total: int, archive_size: int, settings: Settings) -> None:
    if total > settings.max_uncompressed_bytes:
        raise IngestError(
            f"the archive expands to more than {human_bytes(settings.max_uncompressed_bytes)}"
            " (SELFTUNE_MAX_UNCOMPRESSED_BYTES): split it into smaller archives",
            status_code=413,
        )
    if total > settings.max_compression_ratio * max(archive_size, 1):
        raise IngestError(
            f"the archive expands more than {settings.max_compression_ratio:g} times its size "
            f"({human_bytes(archive_size)} to over {human_bytes(total)}), which is how zip "
            "bombs look; images barely compress, so archive the image files themselves",
            status_code=413,
        )


class _EntryCount:
    """An archive's file and folder entries, each kind refused past SELFTUNE_MAX_ARCHIVE_FILES.
    Folder entries do not count as files, but each costs time and memory to read: an archive
    may hold as many of them as files (3 million empty folder entries in a 282 MB zip took
    2 GB of the web's memory)."""

    def __init__(self, settings: Settings) -> None:
        self.limit = settings.max_archive_files
        self.files = self.folders = 0

    def folder(self) -> None:
        self.folders += 1
        if self.folders > self.limit:
            raise IngestError(
                f"the archive has more than {self.limit} folder entries (as many as it may "
                "have files, SELFTUNE_MAX_ARCHIVE_FILES): a dataset needs one folder per "
                "class and split",
                status_code=413,
            )

    def file(self) -> None:
        self.files += 1
        if self.files > self.limit:
            raise IngestError(
                f"the archive has more than {self.limit} files "
                "(SELFTUNE_MAX_ARCHIVE_FILES): split it into smaller datasets",
                status_code=413,
            )


# What a zip starts with (APPNOTE 4.3): a local file header, or the end record of an empty
# zip. `zipfile.is_zipfile` looks for the end record only, which a cut-short zip has lost.
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
# Zip records (APPNOTE 4.3): end of central directory, its zip64 locator and record, and
# the fixed part of one central directory header.
ZIP_END = struct.Struct("<4s4H2LH")
ZIP64_LOCATOR = struct.Struct("<4sLQL")
ZIP64_END = struct.Struct("<4sQ2H2L4Q")
ZIP_DIRECTORY_ENTRY = struct.Struct("<4s4B4HL2L5H2L")


def _check_zip_entry_count(path: Path, settings: Settings) -> None:
    """Count the central directory's entries by their headers alone: zipfile builds an object
    per entry on opening, so a zip of millions of tiny entries must be refused first."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        tail_start = max(0, size - ZIP_END.size - 65535)  # the record plus its longest comment
        handle.seek(tail_start)
        tail = handle.read()
        # Where zipfile finds the record: the last 22 bytes when they are one without a
        # comment, else the last signature. The record's own fields can hold the signature's
        # bytes, so searching alone could read fields as a record and count nothing.
        at = len(tail) - ZIP_END.size
        if at < 0 or not (tail.startswith(b"PK\x05\x06", at) and tail.endswith(b"\0\0")):
            at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < ZIP_END.size:
            return  # not a readable zip: ZipFile says so
        directory_end = tail_start + at
        directory_size = ZIP_END.unpack_from(tail, at)[5]
        if at >= ZIP64_LOCATOR.size and tail[at - ZIP64_LOCATOR.size:].startswith(b"PK\x06\x07"):
            # As zipfile does: the zip64 record sits just before its locator.
            record_at = directory_end - ZIP64_LOCATOR.size - ZIP64_END.size
            handle.seek(max(record_at, 0))
            record = handle.read(ZIP64_END.size)
            if len(record) == ZIP64_END.size and record.startswith(b"PK\x06\x06"):
                directory_end, directory_size = record_at, ZIP64_END.unpack(record)[8]
        position = max(0, directory_end - directory_size)
        handle.seek(position)
        entries = _EntryCount(settings)
        while position + ZIP_DIRECTORY_ENTRY.size <= directory_end:
            header = ZIP_DIRECTORY_ENTRY.unpack(handle.read(ZIP_DIRECTORY_ENTRY.size))
            if header[0] != b"PK\x01\x02":
                return  # a damaged directory: ZipFile says so
            name = handle.read(header[12])
            handle.seek(header[13] + header[14], os.SEEK_CUR)  # extra field, comment
            position += ZIP_DIRECTORY_ENTRY.size + header[12] + header[13] + header[14]
            if name.endswith(b"/"):  # folders are counted apart, as below
                entries.folder()
            else:
                entries.file()


def _zip_members(archive: zipfile.ZipFile, budget: _ByteBudget, settings: Settings):
    """Every entry of a zip, after checking all of them (the central directory is read
    first, so a bad entry is refused before anything is extracted)."""
    members: list[_Member] = []
    entries = _EntryCount(settings)
    declared = 0
    for info in archive.infolist():
        name = zip_entry_name(info)
        path = safe_member_path(name)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise _link_error(name)
        # An empty name makes zipfile's own is_dir() fail: check the name first.
        if not path or name.endswith("/") or stat.S_ISDIR(mode):
            entries.folder()
            members.append(_Member(path, "dir", 0, _no_content))
            continue
        entries.file()
        declared += info.file_size
        kind = "file"
        if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
            kind = "other"
        elif info.flag_bits & 0x1:
            kind = "encrypted"
        elif info.compress_type not in ZIP_METHODS_READ:
            kind = "compression"
        members.append(_Member(path, kind, info.file_size, _zip_opener(archive, info),
                               info.compress_type))
    budget.check_declared(declared)
    return members


# zipfile decompresses a bzip2 or LZMA entry a whole read buffer at a time, whatever it
# expands to (a 3 KB entry to gigabytes in memory); stored and deflated entries are read in
# bounded pieces. The others are skipped, named.
ZIP_METHODS_READ = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
ZIP_METHOD_NAMES = {9: "Deflate64", 12: "bzip2", 14: "LZMA", 93: "Zstandard", 95: "xz",
                    98: "PPMd", 99: "AES encryption"}


def zip_method_reason(method: int) -> str:
    name = ZIP_METHOD_NAMES.get(method, f"method {method}")
    return (f"compressed with {name}, which uploads do not read: re-create the zip with the "
            "usual deflate compression (zip -r, or Windows' Send to > Compressed folder)")


def _zip_opener(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
    return lambda: archive.open(info)


def _no_content() -> IO[bytes]:
    return io.BytesIO()


# A compressed tar's first bytes, and how to decompress it.
TAR_COMPRESSIONS: dict[bytes, Callable[[], object]] = {
    b"\x1f\x8b": lambda: zlib.decompressobj(wbits=31),  # gzip
    b"BZh": bz2.BZ2Decompressor,
    b"\xfd7zXZ\x00": lzma.LZMADecompressor,
}


class _Decompressed(io.RawIOBase):
    """A compressed file read in bounded pieces: each read decompresses no more than it
    returns. tarfile's own stream mode decompresses a whole read buffer at once, and bzip2
    or xz expand a few kilobytes to gigabytes. Streams written one after another (pigz,
    pbzip2) are read on; what follows the last one (zero padding) is not."""

    def __init__(self, raw: IO[bytes], magic: bytes) -> None:
        self._raw, self._magic = raw, magic
        self._decompressor = TAR_COMPRESSIONS[magic]()
        self._input = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not len(buffer):  # zlib takes a max_length of 0 as no limit
            return 0
        while True:
            decompressor = self._decompressor
            if decompressor.eof:
                rest = decompressor.unused_data + self._input or self._raw.read(COPY_CHUNK_BYTES)
                if not rest.startswith(self._magic):
                    return 0
                self._decompressor, self._input = TAR_COMPRESSIONS[self._magic](), rest
                continue
            if not self._input and getattr(decompressor, "needs_input", True):
                self._input = self._raw.read(COPY_CHUNK_BYTES)
            out = decompressor.decompress(self._input, len(buffer))
            # zlib hands back what it did not read; bzip2 and xz keep it themselves.
            self._input = getattr(decompressor, "unconsumed_tail", b"")
            if out:
                buffer[: len(out)] = out
                return len(out)
            if not self._input and not decompressor.eof and not self._raw_left():
                raise EOFError("the compressed data ends early")

    def _raw_left(self) -> bool:
        self._input = self._raw.read(COPY_CHUNK_BYTES)
        return bool(self._input)


class _TarInfo(TarInfoSeeingTheEnd):
    """Refuses an extended header (a long name, pax records) over MAX_TAR_HEADER_BYTES
    before tarfile reads it whole into memory; sees the archive's end (`tar_end_read`)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in EXTENDED_TAR_HEADERS and self.size > MAX_TAR_HEADER_BYTES:
            raise IngestError(
                f"the tar archive has an extended header (a file name or pax record) of "
                f"{human_bytes(self.size)}, over {human_bytes(MAX_TAR_HEADER_BYTES)}: no real "
                "archive needs one; re-create it", status_code=413)
        return super()._proc_member(tarfile_)


EXTENDED_TAR_HEADERS = {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                        tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}


def _open_tar(path: Path, stack: contextlib.ExitStack) -> tarfile.TarFile:
    """The tar stream of `path`, decompressed in bounded pieces where it is compressed."""
    raw = stack.enter_context(open(path, "rb"))  # noqa: SIM115 - the stack closes it
    head = raw.read(8)
    raw.seek(0)
    stream: IO[bytes] = raw
    for magic in TAR_COMPRESSIONS:
        if head.startswith(magic):
            stream = io.BufferedReader(_Decompressed(raw, magic), COPY_CHUNK_BYTES)
            break
    # Names are UTF-8 whatever the locale; other bytes become lone surrogates, found and
    # skipped in _extract_members.
    return stack.enter_context(tarfile.open(
        fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape",
        tarinfo=_TarInfo))


def _tar_members(path: Path, budget: _ByteBudget, settings: Settings) -> Iterator[_Member]:
    """Entries of a tar (any compression) in stream order, checked as they come; each must
    be consumed before the next is read."""
    with contextlib.ExitStack() as stack:
        try:
            archive = _open_tar(path, stack)
        except EOFError as exc:  # compressed data cut short before the first entry ended
            raise _damaged("tar", str(exc)) from None
        except (tarfile.ReadError, OSError, zlib.error, lzma.LZMAError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise IngestError(
                "the upload is not a zip or tar archive (.zip, .tar, .tar.gz, .tgz, .tar.bz2, "
                ".tar.xz): archive your image folder and upload that",
                status_code=415,
            ) from None
        yield from _checked_tar_members(archive, budget, settings)


def _checked_tar_members(archive: tarfile.TarFile, budget: _ByteBudget, settings: Settings
                         ) -> Iterator[_Member]:
    """The entries of an open tar stream, checked as they come."""
    entries = _EntryCount(settings)
    declared = 0
    for info in archive:
        # Stream mode still remembers every header; drop them to keep memory flat.
        archive.members = []
        member_path = safe_member_path(info.name)
        if info.issym() or info.islnk():
            raise _link_error(info.name)
        if info.isdir() or not member_path:
            entries.folder()
            continue
        entries.file()
        # Counted for every kind: tarfile reads through the data of one it skips too.
        declared += info.size
        budget.check_declared(declared)
        if not info.isreg():
            yield _Member(member_path, "other", 0, _no_content)
            continue
        yield _Member(member_path, "file", info.size, _tar_opener(archive, info))
    if not tar_end_read(archive):  # it read as a whole one with a class or test/ missing
        raise _damaged("tar", TAR_CUT_SHORT)


def _tar_opener(archive: tarfile.TarFile, info: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def open_member() -> IO[bytes]:
        stream = archive.extractfile(info)
        if stream is None:
            raise OSError("entry has no content")
        return stream

    return open_member


# --- Verifying entries ----------------------------------------------------------------------


@dataclass
class _Image:
    """An extracted entry that decodes as a supported image."""

    order: int
    path: str
    temp: Path
    sha256: str
    size: int
    width: int
    height: int
    suffix: str
    brightest: float | None = None  # images of more than 8 bits (`pixels.brightest_value`)


@dataclass
class _Extraction:
    images: list[_Image] = field(default_factory=list)
    skipped: list[tuple[int, SkippedFile]] = field(default_factory=list)
    file_paths: set[str] = field(default_factory=set)
    labels_csvs: list[tuple[str, bytes]] = field(default_factory=list)

    def skip(self, order: int, path: str, reason: str) -> None:
        self.skipped.append((order, SkippedFile(path, reason)))


def _skip_reason_by_name(path: str) -> str | None:
    return skip_reason_by_name(path.split("/"))


def _copy_member(
    stream: IO[bytes], destination: Path, budget: _ByteBudget, limit: int | None = None,
    head: bytes = b"",
) -> tuple[str, int]:
    """Write `head` (the start, already read from the stream) and the rest of the stream."""
    digest = hashlib.sha256()
    written = 0
    with open(destination, "wb") as out:
        for chunk in _chunks(head, stream):
            written += len(chunk)
            budget.consume(len(chunk))
            if limit is not None and written > limit:
                raise IngestError(f"labels.csv is larger than {human_bytes(limit)}")
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), written


def _chunks(head: bytes, stream: IO[bytes]) -> Iterator[bytes]:
    if head:
        yield head
    while chunk := stream.read(COPY_CHUNK_BYTES):
        yield chunk


# Photos in formats this app does not read, and what to make of them: the usual way a whole
# class folder goes missing (a folder of iPhone photos).
_HEIC = ("; an iPhone's HEIC photo: export it as JPEG (or set the iPhone's Camera › Formats "
         "to Most Compatible)")
_RAW = "; a camera's raw file: export it as JPEG or TIFF"
CONVERT_HINTS = {".heic": _HEIC, ".heif": _HEIC, ".dng": _RAW, ".cr2": _RAW, ".cr3": _RAW,
                 ".nef": _RAW, ".arw": _RAW, ".raf": _RAW, ".orf": _RAW, ".rw2": _RAW}


def inspect_image(path: Path, archive_path: str, max_pixels: int
                  ) -> tuple[str, int, int, float | None]:
    """(stored suffix, width, height, brightest value of more than 8 bits or None) of a
    decodable image; raises IngestError for one over the pixel limit and ValueError (with
    the reason) for one that does not decode."""
    try:
        with Image.open(path, formats=OPEN_FORMATS) as image:
            width, height = image.size
            # The header is all that has been read so far: refuse bombs before decoding.
            _check_pixels(archive_path, width, height, max_pixels)
            image.load()  # full decode of the first frame: truncated data fails here
            return STORED_FORMATS[image.format or ""], width, height, brightest_value(image)
    except IngestError:
        raise
    except UnidentifiedImageError:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty") from None
        raise ValueError(f"corrupt or unsupported image (not {SUPPORTED_TEXT})") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on damaged data
        message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ValueError(f"corrupt image: {message}") from None


def _check_pixels(archive_path: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise IngestError(
            f"image {quoted(archive_path)} declares {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,} (SELFTUNE_MAX_IMAGE_PIXELS); huge dimensions "
            "are how decompression bombs look: downscale the image or remove it",
        )


def _extract(archive_path: Path, incoming: Path, settings: Settings,
             abandoned: threading.Event | None = None) -> _Extraction:
    """Extract every image candidate to `incoming`, verify it, and note what was skipped."""
    archive_size = archive_path.stat().st_size
    if archive_size == 0:
        raise IngestError("the uploaded file is empty", status_code=415)
    budget = _ByteBudget(settings, archive_size)
    result = _Extraction()
    incoming.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive_path):
        _check_zip_entry_count(archive_path, settings)
        try:
            with zipfile.ZipFile(archive_path) as archive:
                _extract_members(_zip_members(archive, budget, settings), incoming, budget,
                                 settings, result, abandoned)
        except (zipfile.BadZipFile, EOFError) as exc:
            raise _damaged("zip", str(exc)) from None
        except UnicodeDecodeError as exc:
            # zipfile decodes names flagged as UTF-8 strictly (the others as cp437).
            raise IngestError(
                "the zip archive is damaged: a file name is marked as UTF-8 but is not valid "
                f"UTF-8 ({exc.object[:200].decode('utf-8', 'replace')!r}): re-create the "
                "archive with a current zip tool"
            ) from None
    elif _starts_like_a_zip(archive_path):
        raise _damaged("zip", "its central directory, at the end of the file, is missing")
    else:
        try:
            _extract_members(_tar_members(archive_path, budget, settings), incoming, budget,
                             settings, result, abandoned)
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            # Decompressors raise OSError without an errno; one with an errno (a full disk)
            # is ours, not the archive's.
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise _damaged("tar", str(exc)) from None
    return result


def _starts_like_a_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4).startswith(ZIP_SIGNATURES)


def _damaged(kind: str, cause: str) -> IngestError:
    """A damaged archive: most often one cut short by an interrupted download or copy."""
    return IngestError(
        f"the {kind} archive is damaged or truncated (cut short by an incomplete download?): "
        f"{cause}; make or download the archive again"
    )


def _extract_members(
    members, incoming: Path, budget: _ByteBudget, settings: Settings, result: _Extraction,
    abandoned: threading.Event | None = None,
) -> None:
    for order, member in enumerate(members):
        _check_wanted(abandoned)
        if member.kind == "dir":
            continue
        path = member.path
        utf8_name = is_utf8_name(path)
        if not utf8_name:
            path = printable_name(path)  # nothing with a surrogate goes further
        if utf8_name and path in result.file_paths:
            # Unpacking would keep one of the two; which one the user meant is unknown.
            result.skip(order, path, "a second file with the same path in the archive (added "
                                     "twice?): the first one is kept")
            continue
        result.file_paths.add(path)
        if reason := _skip_reason_by_name(path):
            result.skip(order, path, reason)
            continue
        if not utf8_name:
            result.skip(order, path, NOT_UTF8_REASON)
            continue
        if member.kind == "other":
            result.skip(order, path, "not a regular file")
            continue
        if member.kind == "encrypted":
            result.skip(order, path, "encrypted entry: archive it without a password")
            continue
        if member.kind == "compression":
            result.skip(order, path, zip_method_reason(member.compression))
            continue
        is_labels_csv = PurePosixPath(path).name.lower() == LABELS_CSV
        suffix = PurePosixPath(path).suffix.lower()
        # Without an image extension ("photo", "photo.jpg_large") the content decides.
        sniff = not is_labels_csv and suffix not in IMAGE_SUFFIXES
        temp = incoming / str(order)
        try:
            with member.open() as stream:
                head = stream.read(SNIFF_BYTES) if sniff else b""
                if sniff and not looks_like_image(head):
                    result.skip(order, path, f"not an image ({suffix or 'no extension'}); "
                                             f"supported: {SUPPORTED_TEXT}"
                                             f"{CONVERT_HINTS.get(suffix, '')}")
                    continue
                limit = MAX_LABELS_CSV_BYTES if is_labels_csv else None
                sha256, size = _copy_member(stream, temp, budget, limit, head)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, zlib.error,
                UnicodeDecodeError) as exc:
            # UnicodeDecodeError: a local header's name flagged as UTF-8 that is not.
            # Only zip entries fail one by one; a broken tar stream fails the whole archive.
            temp.unlink(missing_ok=True)
            result.skip(order, path, f"damaged archive entry: {exc}")
            continue
        if is_labels_csv:
            result.labels_csvs.append((path, temp.read_bytes()))
            temp.unlink()
            continue
        try:
            suffix, width, height, brightest = inspect_image(temp, path,
                                                             settings.max_image_pixels)
        except ValueError as exc:
            temp.unlink()
            result.skip(order, path, str(exc))
            continue
        result.images.append(_Image(order, path, temp, sha256, size, width, height, suffix,
                                    brightest))


# --- Layout: which split and class each image belongs to ----------------------------------


@dataclass
class _Placed:
    image: _Image
    split: str  # train | test | unlabeled
    class_name: str | None


def _strip_wrappers(paths: list[str]) -> int:
    """How many leading folders every image shares (single wrapping folders, nested too);
    `train/` or `unlabeled/` is never a wrapper, and class folders stay. A test split folder
    (`test/`, `val/`) holding everything is one: a test split alone has nothing to train on,
    so such an archive is a dataset's val/ folder zipped on its own. A folder with
    sub-folders is a wrapper even with a stray image of its own (a cover picture, say): that
    image then lies outside every class folder, as it would without the wrapper."""
    depth = 0
    split_paths = [path.split("/") for path in paths]
    while (split_paths and all(len(parts) >= depth + 2 for parts in split_paths)
           and any(len(parts) >= depth + 3 for parts in split_paths)):
        first = {parts[depth] for parts in split_paths}
        if len(first) != 1:
            break
        (name,) = first
        if SPLITS.get(name.lower()) == "train" or name.lower() == UNLABELED_FOLDER:
            break
        depth += 1
    return depth


class _Where(NamedTuple):
    split: str  # train | test | unlabeled
    class_name: str | None  # None: unlabeled, or skipped
    skip_reason: str | None = None


@dataclass(frozen=True)
class _FolderLayout:
    """An archive laid out by folders (no labels.csv): below the wrapping folders every image
    shares (`prefix`, `_strip_wrappers`), an optional split folder, then a class folder or
    unlabeled/. With a train/ folder, files beside it are outside the dataset."""
    prefix: tuple[str, ...]
    has_train: bool

    @classmethod
    def of(cls, images: list[_Image]) -> _FolderLayout:
        depth = _strip_wrappers([image.path for image in images])
        relative = [image.path.split("/")[depth:] for image in images]
        tops = {parts[0].lower() for parts in relative if len(parts) > 1}
        if "test" in tops and "val" in tops:
            raise IngestError(
                "the archive has both test/ and val/ folders: keep one of them as the test "
                "split (merge or remove the other)"
            )
        prefix = tuple(images[0].path.split("/")[:depth]) if images else ()
        return cls(prefix, "train" in tops)

    def place(self, path: str) -> _Where:
        """Where the file at `path` goes: its split and class, or why it is skipped."""
        if (reason := _skip_reason_by_name(path)) is not None:  # __MACOSX/cat/._1.jpg
            return _Where("train", None, reason)
        parts = path.split("/")
        if tuple(parts[:len(self.prefix)]) != self.prefix:
            return _Where("train", None, "outside the folder that holds the images")
        parts = parts[len(self.prefix):]
        split = "train"
        top = parts[0].lower() if len(parts) > 1 else ""
        if top in SPLITS:
            split = SPLITS[top]
            parts = parts[1:]
        elif self.has_train and top != UNLABELED_FOLDER:
            return _Where(split, None, "outside the train/ and test/ folders")
        if len(parts) < 2:
            return _Where(split, None,
                          "not inside a class folder: put it in <class>/ or unlabeled/")
        if parts[0].lower() == UNLABELED_FOLDER and split == "test":
            return _Where(split, None, UNLABELED_IN_TEST)
        if parts[0].lower() == UNLABELED_FOLDER:
            return _Where("unlabeled", None)
        if CONTROL_CHARACTERS.search(parts[0]):
            return _Where(split, None, "its class folder's name has a control character (a "
                                       "tab or line break): rename the folder")
        if not (name := class_name(parts[0])):
            return _Where(split, None, BLANK_CLASS_FOLDER)
        return _Where(split, name)


def _layout_by_folders(images: list[_Image], layout: _FolderLayout,
                       skip: Callable[[_Image, str], None]) -> list[_Placed]:
    placed: list[_Placed] = []
    for image in images:
        where = layout.place(image.path)
        if where.skip_reason is not None:
            skip(image, where.skip_reason)
        else:
            placed.append(_Placed(image, where.split, where.class_name))
    return placed


def _parse_labels_csv(csv_path: str, data: bytes, present: set[str]) -> dict[str, LabelsRow]:
    """labels.csv rows by path relative to the csv's folder (`parse_labels_csv`), where the
    archive's files are `present`."""

    def inside_archive(raw: str) -> str:
        try:
            return safe_member_path(raw)
        except IngestError:
            raise ValueError(f"path {quoted(raw)} must be relative to the folder of {csv_path}, "
                             "without '..' or a leading '/'") from None

    try:
        return parse_labels_csv(data, csv_path, lambda written: spaced_path(
            written, inside_archive, present.__contains__))
    except ValueError as exc:
        raise IngestError(str(exc)) from None


def _lost_class_warnings(layout: _FolderLayout, skipped: list[SkippedFile],
                         classes: set[str]) -> list[str]:
    """Class folders of the training images none of whose files is kept (each skipped:
    HEIC photos, files that do not open, duplicates): the class is gone from the dataset
    without a word but the skipped files' list. Said, with how many files it had."""
    lost: Counter[str] = Counter()
    for entry in skipped:
        where = layout.place(entry.path)
        if (where.split == "train" and where.skip_reason is None
                and where.class_name is not None and where.class_name not in classes):
            lost[where.class_name] += 1
    return lost_class_warnings(lost)


def _layout_by_csv(
    images: list[_Image], file_paths: set[str], csv_path: str, data: bytes,
    skip: Callable[[_Image, str], None], hint: str = "",
) -> list[_Placed]:
    folder = str(PurePosixPath(csv_path).parent)
    prefix = "" if folder == "." else folder + "/"
    present = {path[len(prefix):] for path in file_paths if path.startswith(prefix)}
    rows = _parse_labels_csv(csv_path, data, present)
    missing = sorted(path for path in rows if path not in present)
    if missing:
        raise IngestError(
            f"{csv_path} names {len(missing)} file(s) that are not in the archive: "
            f"{quoted_list(missing)}; paths are relative to the folder of {csv_path}"
            f"{header_hint(rows[path] for path in missing)}{hint}"
        )
    placed: list[_Placed] = []
    for image in images:
        relative = image.path[len(prefix):] if image.path.startswith(prefix) else None
        if relative is None or relative not in rows:
            skip(image, f"not listed in {csv_path}")
            continue
        row = rows[relative]
        if row.label is None:
            placed.append(_Placed(image, "unlabeled", None))
        else:
            placed.append(_Placed(image, row.split, row.label))
    return placed


# --- Planning the stored dataset ------------------------------------------------------------


@dataclass(frozen=True)
class StoredImage:
    path: str  # relative to the dataset directory
    original_path: str
    split: str
    label: int | None
    sha256: str
    width: int
    height: int
    size: int


@dataclass
class PreparedDataset:
    """A verified dataset laid out in a private directory, ready to be published."""

    directory: Path
    class_names: list[str]
    images: list[StoredImage]
    skipped: list[SkippedFile]
    test_source: str
    # How its images of more than 8 bits become 8-bit ones (`pixels.white_level_of`).
    white_level: int | None = None
    # A dataset made from another by adding labels (app.add_labels): that one, and how many.
    derived_from_id: int | None = None
    labels_added: int = 0
    # What the upload looked wrong in (`Dataset.upload_warnings`).
    upload_warnings: list[str] = field(default_factory=list)

    @property
    def class_counts(self) -> dict[str, dict[str, int]]:
        counts = Counter((image.split, image.label) for image in self.images)
        return {
            name: {"train": counts[("train", index)], "test": counts[("test", index)]}
            for index, name in enumerate(self.class_names)
        }

    @property
    def unlabeled_count(self) -> int:
        return sum(1 for image in self.images if image.split == "unlabeled")

    @property
    def size_bytes(self) -> int:
        return sum(image.size for image in self.images)

    @property
    def fingerprint(self) -> str:
        return dataset_fingerprint(
            (image.split, self.class_names[image.label] if image.label is not None else "",
             image.sha256)
            for image in self.images
        )


def dataset_fingerprint(entries) -> str:
    """sha256 over the sorted (split, class name, image sha256) entries: the same content
    gives the same fingerprint whatever the archive looked like."""
    digest = hashlib.sha256()
    for split, label, sha256 in sorted(entries):
        digest.update(f"{split}\t{label}\t{sha256}\n".encode())
    return digest.hexdigest()


def skip_category(reason: str) -> str:
    """The kind of a skip reason, without the file-specific part ("duplicate of x")."""
    return re.split(r"[(:;]| of ", reason, maxsplit=1)[0].strip()


def _not_utf8_hint(extraction: _Extraction) -> str:
    """For errors that names skipped as not UTF-8 may explain (a class folder, say)."""
    bad = [item.path for _, item in extraction.skipped if item.reason == NOT_UTF8_REASON]
    if not bad:
        return ""
    return (
        f" ({len(bad)} file(s) skipped because their name or folder name is not valid UTF-8, "
        f"such as {quoted(bad[0])}: rename them, or archive them with a tool that stores UTF-8 "
        "names)"
    )


def _no_usable_images(extraction: _Extraction, skipped: list[SkippedFile]) -> IngestError:
    if not extraction.images and (hint := _not_utf8_hint(extraction)):
        return IngestError(f"the archive has no usable images{hint}")
    reasons = Counter(skip_category(item.reason) for item in skipped)
    summary = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common(4))
    if not extraction.images and not any(reason.startswith("corrupt") for reason in reasons):
        others = f" ({len(skipped)} other file(s) skipped: {summary})" if skipped else ""
        return IngestError(
            f"the archive has no images: add {SUPPORTED_TEXT} files, one folder per class "
            f"(<class>/<image>){others}"
        )
    examples = "; ".join(f"{item.path!r}: {item.reason}" for item in skipped[:3])
    return IngestError(
        f"the archive has no usable images ({len(skipped)} skipped: {summary}), for example "
        f"{examples}"
    )


def prepare_dataset(archive_path: Path, work_dir: Path, settings: Settings,
                    abandoned: threading.Event | None = None) -> PreparedDataset:
    """Read, verify and lay out an archive under `work_dir/dataset` (nothing else is touched).
    Raises IngestError with what to fix, or UploadAbandoned once `abandoned` is set; the
    caller removes `work_dir` either way."""
    extraction = _extract(archive_path, work_dir / "incoming", settings, abandoned)
    skipped_at: list[tuple[int, SkippedFile]] = list(extraction.skipped)

    def skip(image: _Image, reason: str) -> None:
        skipped_at.append((image.order, SkippedFile(image.path, reason)))

    layout: _FolderLayout | None = None
    if extraction.labels_csvs:
        csvs = sorted(extraction.labels_csvs, key=lambda item: item[0].count("/"))
        if len(csvs) > 1 and csvs[0][0].count("/") == csvs[1][0].count("/"):
            raise IngestError(
                f"found several {LABELS_CSV} files ({quoted_list([c[0] for c in csvs])}): "
                "keep one"
            )
        csv_path, data = csvs[0]
        placed = _layout_by_csv(extraction.images, extraction.file_paths, csv_path, data, skip,
                                _not_utf8_hint(extraction))
        upload_warnings = folder_disagreements(
            ((item.image.path, item.class_name) for item in placed), csv_path)
    else:
        layout = _FolderLayout.of(extraction.images)
        placed = _layout_by_folders(extraction.images, layout, skip)
        upload_warnings = []

    # Exact duplicates: a copy with a class stays over an unlabeled one (zip tools list
    # unlabeled/ before zebra/, and the class must not vanish); else the first in archive
    # order, whatever its split.
    # A copy labeled with another class says so: one of the two labels is wrong.
    first_by_sha: dict[str, _Placed] = {}
    kept: list[_Placed] = []
    copies: Counter[str] = Counter()  # a class's images skipped as copies of one of its own
    for item in sorted(placed, key=lambda item: (item.class_name is None, item.image.order)):
        if (first := first_by_sha.get(item.image.sha256)) is not None:
            conflict = (item.class_name is not None and first.class_name is not None
                        and item.class_name != first.class_name)
            if item.class_name is not None and item.class_name == first.class_name:
                copies[item.class_name] += 1
            skip(item.image, f"duplicate of {first.image.path}" + (
                f", which is labeled {first.class_name!r}: kept as {first.class_name!r}, "
                f"not {item.class_name!r} (conflicting labels: check which is right)"
                if conflict else ""))
            continue
        first_by_sha[item.image.sha256] = item
        kept.append(item)
    skipped = [entry for _, entry in sorted(skipped_at, key=lambda pair: pair[0])]
    if not kept:
        raise _no_usable_images(extraction, skipped)

    train_classes = {item.class_name for item in kept if item.split == "train"} - {None}
    test_classes = {item.class_name for item in kept if item.split == "test"} - {None}
    if only_in_test := sorted(test_classes - train_classes, key=natural_key):
        raise IngestError(
            classes_phrase(only_in_test, "has", "have") + " test images but no training "
            "images: add training images or remove them from the test split"
        )
    if len(train_classes) < 2:
        found = f" ({quoted_list(sorted(train_classes))})" if train_classes else ""
        raise IngestError(
            f"found {len(train_classes)} class{'' if len(train_classes) == 1 else 'es'}{found};"
            " at least two are needed: put labeled images in one folder per class "
            f"(<class>/<image>) or list them in labels.csv{_not_utf8_hint(extraction)}"
        )
    class_names = sorted(train_classes, key=natural_key)
    class_index = {name: index for index, name in enumerate(class_names)}
    if layout is not None:
        upload_warnings += _lost_class_warnings(layout, skipped, train_classes)

    test_source = "uploaded" if test_classes else "holdout"
    if test_source == "holdout":
        kept = _hold_out(kept, class_names, settings, copies)

    directory = work_dir / "dataset"
    directory.mkdir(parents=True)
    stored: list[StoredImage] = []
    for number, item in enumerate(sorted(kept, key=lambda item: item.image.order)):
        label = class_index[item.class_name] if item.class_name is not None else None
        folder = item.split if label is None else f"{item.split}/{label}"
        relative = f"{folder}/{number}.{item.image.suffix}"
        (directory / folder).mkdir(parents=True, exist_ok=True)
        os.rename(item.image.temp, directory / relative)
        stored.append(StoredImage(
            relative, item.image.path, item.split, label, item.image.sha256,
            item.image.width, item.image.height, item.image.size,
        ))
    brightest = [item.image.brightest for item in kept if item.image.brightest is not None]
    return PreparedDataset(directory, class_names, stored, skipped, test_source,
                           white_level_for(max(brightest, default=None)),
                           upload_warnings=upload_warnings)


def _hold_out(kept: list[_Placed], class_names: list[str], settings: Settings,
              copies: Counter[str]) -> list[_Placed]:
    """Move a stratified, seeded share of each class to the test split (shared sampler).
    `copies`: each class's images skipped as copies of another of its own, which a class
    left with one image is told of (it had three files: "only one labeled image" alone
    read as wrong)."""
    class_index = {name: index for index, name in enumerate(class_names)}
    labeled = sorted(
        (item for item in kept if item.split == "train"),
        # Ordered by content so that the same images give the same split however archived.
        key=lambda item: (class_index[item.class_name], item.image.sha256),
    )
    sizes = Counter(item.class_name for item in labeled)
    if too_small := [name for name in class_names if sizes[name] < 2]:
        def copied_in(name: str) -> str:
            more = f"{copies[name]} more {'is a copy' if copies[name] == 1 else 'are copies'}"
            return f"{more} of it" if len(too_small) == 1 else f"{name!r}: {more} of its image"

        copied = [copied_in(name) for name in too_small if copies[name]]
        raise IngestError(
            classes_phrase(too_small, "has", "have") + " only one labeled image"
            + (f" ({'; '.join(copied)}, skipped as duplicates)" if copied else "")
            + ": without a test/ folder a test split is held out of every class, so give "
            "each class at least two images or upload a test/ folder"
        )
    labels = [class_index[item.class_name] for item in labeled]
    _, held_out = split_holdout(labels, settings.holdout_fraction, settings.holdout_seed)
    for index in held_out:
        labeled[index].split = "test"
    return kept


# --- Publishing, deleting, cleaning up ------------------------------------------------------


# In an upload's work directory: a file the process handling the upload holds a lock on
# (flock) until it removes the directory. The kernel lets go of the lock when the process
# dies, however it dies, so a directory whose lock is free is a crashed upload's, whatever
# its age: the next start removes it (`cleanup_orphans`), where it had waited out the grace
# time (a crashed multi-GiB upload kept twice its size on disk until a later restart).
HELD_FILE = ".held"
_HELD: dict[Path, int] = {}  # work directory: the descriptor holding its lock


def new_work_dir(settings: Settings) -> Path:
    """A private directory under tmp/ for one upload, held by this process until
    `remove_work_dir` (or its death: then the next start removes it)."""
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    work_dir = settings.tmp_dir / f"upload-{uuid.uuid4().hex}"
    work_dir.mkdir()
    handle = os.open(work_dir / HELD_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(handle, fcntl.LOCK_EX)
    _HELD[work_dir] = handle
    return work_dir


def remove_work_dir(work_dir: Path) -> None:
    """Remove an upload's work directory, then let go of its lock."""
    shutil.rmtree(work_dir, ignore_errors=True)
    if (handle := _HELD.pop(work_dir, None)) is not None:
        os.close(handle)


def _work_dir_abandoned(work_dir: Path) -> bool | None:
    """Whether no process holds an upload's work directory (`new_work_dir`); None where it
    has no lock file to tell (one being made, or made by an older version)."""
    try:
        handle = os.open(work_dir / HELD_FILE, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(handle)  # lets go of a lock it took: the directory is removed next
    return True


def publish_dataset(session: Session, settings: Settings, prepared: PreparedDataset,
                    name: str) -> Dataset:
    """Move the verified tree into datasets/ and commit its rows; either both happen or
    neither is visible (a directory without rows is an orphan that cleanup removes)."""
    storage_key = uuid.uuid4().hex
    dataset = Dataset(
        name=name, storage_key=storage_key, fingerprint=prepared.fingerprint,
        class_names=prepared.class_names, class_counts=prepared.class_counts,
        unlabeled_count=prepared.unlabeled_count, image_count=len(prepared.images),
        test_source=prepared.test_source,
        skipped=[{"path": item.path, "reason": item.reason}
                 for item in prepared.skipped[:MAX_SKIPPED_KEPT]],
        skipped_count=len(prepared.skipped),
        size_bytes=prepared.size_bytes,
        derived_from_id=prepared.derived_from_id, labels_added=prepared.labels_added,
        upload_warnings=prepared.upload_warnings,
    )
    target = settings.datasets_dir / storage_key
    moved = False
    try:
        session.add(dataset)
        session.flush()
        if prepared.images:
            session.execute(insert(DatasetImage), [
                {"dataset_id": dataset.id, "path": image.path,
                 "original_path": image.original_path[:MAX_PATH_CHARS], "split": image.split,
                 "label": image.label, "sha256": image.sha256, "width": image.width,
                 "height": image.height}
                for image in prepared.images
            ])
        settings.datasets_dir.mkdir(parents=True, exist_ok=True)
        # A fresh mtime keeps the not-yet-committed directory inside cleanup's grace period.
        os.utime(prepared.directory)
        os.rename(prepared.directory, target)
        moved = True
        session.commit()
    except BaseException:
        session.rollback()
        if moved:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return dataset


def ingest_archive(session: Session, settings: Settings, archive_path: Path, work_dir: Path,
                   name: str, abandoned: threading.Event | None = None) -> Dataset:
    """Verify the archive in `work_dir` and publish it as a new dataset, unless `abandoned`
    is set first (UploadAbandoned)."""
    started = time.monotonic()
    prepared = prepare_dataset(archive_path, work_dir, settings, abandoned)
    _check_wanted(abandoned)
    dataset = publish_dataset(session, settings, prepared, name)
    try:  # known now, so that the first thumbnails need not read every image for it
        record_white_level(settings, dataset, prepared.white_level)
    except OSError:
        log.warning("dataset %s: white level not recorded; thumbnails work it out", dataset.id)
    log.info("dataset %s (%r): %d images, %d classes, %d skipped in %.1fs", dataset.id, name,
             dataset.image_count, len(dataset.class_names), dataset.skipped_count,
             time.monotonic() - started)
    return dataset


def dataset_dir(settings: Settings, dataset: Dataset) -> Path:
    return settings.datasets_dir / dataset.storage_key


def thumbnail_dir(settings: Settings, dataset: Dataset) -> Path:
    return settings.cache_dir / "thumbs" / dataset.storage_key


# The worker's decoded-image cache of a dataset (worker/training.py): one folder per dataset,
# with one .npy per split and image size.
_IMAGE_CACHE = re.compile(r"dataset-(?P<id>\d+)-(?P<fingerprint>[0-9a-f]+)")


def image_cache_dir(settings: Settings, dataset: Dataset) -> Path:
    """Where workers keep the dataset's decoded images (worker/training.py)."""
    return settings.cache_dir / f"dataset-{dataset.id}-{dataset.fingerprint[:12]}"


def image_cache_dirs(settings: Settings, dataset_id: int) -> list[Path]:
    """Every decoded-image cache folder of a dataset id, whatever fingerprint it was made for."""
    if not settings.cache_dir.is_dir():
        return []
    return [
        entry for entry in settings.cache_dir.glob(f"dataset-{dataset_id}-*")
        if (match := _IMAGE_CACHE.fullmatch(entry.name)) and int(match["id"]) == dataset_id
    ]


def image_file(settings: Settings, dataset: Dataset, image: DatasetImage) -> Path:
    """The stored file of an image, resolved strictly inside the dataset's directory."""
    root = dataset_dir(settings, dataset).resolve()
    path = (root / image.path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise FileNotFoundError(image.path)
    return path


WHITE_LEVEL_FILE = "white-level.json"
# One request at a time works a dataset's white level out (it reads every image of more than
# 8 bits); the others wait for its record instead of each reading them all again. A dataset's
# lock lasts while a request holds it (weak values; each request keeps it in a variable), not
# for the life of the process: one a dataset ever shown added up.
_WHITE_LEVEL_LOCKS: weakref.WeakValueDictionary[str, threading.Lock] = (
    weakref.WeakValueDictionary())
_WHITE_LEVEL_LOCKS_GUARD = threading.Lock()


def dataset_white_level(settings: Settings, dataset: Dataset) -> int | None:
    """The white level a worker scales this dataset's images of more than 8 bits by
    (`pixels.white_level_of` over every image of it, as a run's are): recorded with the
    thumbnails at upload, worked out here for a dataset without the record."""
    record = thumbnail_dir(settings, dataset) / WHITE_LEVEL_FILE
    known, level = _read_white_level(record)
    if known:
        return level
    with _WHITE_LEVEL_LOCKS_GUARD:
        lock = _WHITE_LEVEL_LOCKS.setdefault(dataset.storage_key, threading.Lock())
    with lock:
        known, level = _read_white_level(record)  # worked out while this request waited
        if known:
            return level
        # Datasets uploaded before uploads recorded it.
        root = dataset_dir(settings, dataset)
        level = white_level_of(root / image.path for image in dataset.images)
        record_white_level(settings, dataset, level)
    return level


def record_white_level(settings: Settings, dataset: Dataset, level: int | None) -> None:
    record = thumbnail_dir(settings, dataset) / WHITE_LEVEL_FILE
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(f".{WHITE_LEVEL_FILE}.{uuid.uuid4().hex}")
    partial.write_text(json.dumps({"white_level": level, "levels": list(WHITE_LEVELS)}))
    os.replace(partial, record)


def _read_white_level(record: Path) -> tuple[bool, int | None]:
    """(known, level) from the record. A level chosen among other WHITE_LEVELS is not known:
    before 1 was one, 0-1 float images recorded 255 and their thumbnails showed black, while
    the worker, which works the level out from the files, trains them at 1. A dataset of
    8-bit images alone has none whatever the levels."""
    try:
        saved = json.loads(record.read_text())
        level = saved["white_level"]
        if level is not None and saved.get("levels") != list(WHITE_LEVELS):
            return False, None
        return True, level
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False, None


# How thumbnails are made, in their names and ETags, so that a change makes them again:
# 2 drops transparency as the worker does (1 painted it white).
THUMBNAIL_RECIPE = 2


def thumbnail_version(white_level: int | None, size: int = THUMBNAIL_SIZE) -> str:
    """How a thumbnail is made: its recipe, the white level it was made 8-bit with where the
    dataset has one, and its size where it is not the usual one."""
    return (f"t{THUMBNAIL_RECIPE}" + ("" if white_level is None else f"-w{white_level}")
            + ("" if size == THUMBNAIL_SIZE else f"-{size}px"))


def thumbnail(settings: Settings, dataset: Dataset, image: DatasetImage,
              white_level: int | None, size: int = THUMBNAIL_SIZE) -> Path:
    """A JPEG of at most `size` px a side, made on first request and cached; `white_level`
    is the dataset's (`dataset_white_level`)."""
    folder = thumbnail_dir(settings, dataset)
    # Named by how it was made: one made otherwise (an older version) is not this one, and
    # nothing is deleted under a request serving it.
    cached = folder / f"{image.id}-{thumbnail_version(white_level, size)}.jpg"
    if cached.is_file():
        return cached
    source = image_file(settings, dataset, image)
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(source, formats=OPEN_FORMATS) as opened:
        if image.width and opened.size != (image.width, image.height):
            # Not the image whose size was checked at upload (Pillow's own limit is off).
            raise FileNotFoundError(f"{image.path} is not the file that was uploaded")
        opened.draft("RGB", (size, size))
        # The pixels the worker trains on, then made small: transparency dropped (a white
        # logo on a transparent black ground trains white on black, and shows so).
        small = to_rgb(opened, white_level)
        small.thumbnail((size, size))
    # Written aside and renamed so a concurrent request never serves half a file.
    partial = folder / f".{image.id}.{uuid.uuid4().hex}.jpg"
    small.save(partial, "JPEG", quality=85)
    os.replace(partial, cached)
    return cached


def active_run_count(session: Session, dataset_id: int) -> int:
    return session.scalar(
        select(func.count()).select_from(Run)
        .where(Run.dataset_id == dataset_id, Run.status.in_(TO_GO_STATUSES))
    ) or 0


def delete_dataset(session: Session, settings: Settings, dataset: Dataset
                   ) -> tuple[list[int], list[int], list[Path]]:
    """Delete a dataset with its images, experiments, runs and their files; refused (409)
    while a run of it is queued or running, or while queued or running runs start from one
    of its runs' models. Returns the deleted (experiment ids, run ids), whose live feeds the
    caller forgets (app.live.forget_feeds), and the folders of its images and runs, moved aside
    for the caller to remove (`app.trash.empty_trash`) once it has answered."""
    # Lock the dataset row first so that no run can be queued on it between the check and
    # the delete: FOR UPDATE on PostgreSQL; SQLite takes its write lock on the first write.
    dataset_id = dataset.id
    session.execute(select(Dataset.id).where(Dataset.id == dataset_id).with_for_update())
    locked = session.execute(
        update(Dataset).where(Dataset.id == dataset_id).values(name=Dataset.name)).rowcount
    if not locked:  # a delete running alongside this one took it first
        session.rollback()
        raise IngestError(f"dataset {dataset_id} does not exist", status_code=404)
    if active := active_run_count(session, dataset.id):
        session.rollback()
        raise IngestError(
            f"dataset {dataset.id} is used by {active} queued or running run(s): cancel them "
            "or wait for them to finish, then delete it",
            status_code=409,
        )
    experiment_ids = session.scalars(
        select(Experiment.id).where(Experiment.dataset_id == dataset.id)
    ).all()
    run_ids = session.scalars(
        select(Run.id).where(
            (Run.dataset_id == dataset.id) | Run.experiment_id.in_(experiment_ids)
        )
    ).all()
    if reason := weights_in_use(session, settings, run_ids, f"dataset {dataset.id}"):
        session.rollback()
        raise IngestError(reason, status_code=409)
    delete_run_rows(session, run_ids)
    session.execute(delete(Experiment).where(Experiment.dataset_id == dataset.id))
    session.execute(delete(DatasetImage).where(DatasetImage.dataset_id == dataset.id))
    session.execute(delete(Dataset).where(Dataset.id == dataset.id))
    session.commit()
    # Files go after the commit: a crash here leaves only invisible orphans for cleanup.
    aside = move_to_trash(settings, [dataset_dir(settings, dataset),
                                     thumbnail_dir(settings, dataset),
                                     *image_cache_dirs(settings, dataset.id),
                                     *run_folders(settings, run_ids)])
    return list(experiment_ids), list(run_ids), aside


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except FileNotFoundError:
                    continue
    return newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def cleanup_orphans(settings: Settings, session_factory: Callable[[], Session] | None = None,
                    grace_s: float = 600.0) -> list[Path]:
    """Remove what a crash can leave: upload work directories under tmp/, and dataset,
    thumbnail and decoded-image cache directories without a database row (a worker removes
    the abandoned temporary files of the caches it uses), and run folders (runs/<id>) of runs
    that no longer exist (one a worker that missed the delete made again, say), and in the
    others the files a process that died left half-written (a web killed while it made a
    run's model.onnx or checkpoint zip for a download). Anything
    touched in the last `grace_s` seconds is kept, since another web process may be
    publishing it right now. Only what the database, read now, does not list goes: the web
    calls this once it has checked that the data directory is this database's
    (app.db.claim_data_dir)."""
    now = time.time()
    removed: list[Path] = []

    def stale(path: Path) -> bool:
        try:
            return now - _newest_mtime(path) > grace_s
        except FileNotFoundError:
            return False

    if settings.tmp_dir.is_dir():
        for entry in settings.tmp_dir.iterdir():
            if entry.name.startswith("upload-") and (
                    abandoned := _work_dir_abandoned(entry)) is not False and (
                    abandoned or stale(entry)):
                _remove(entry)
                removed.append(entry)
    if trash_dir(settings).is_dir():  # deleted already: its removal was cut short
        for entry in trash_dir(settings).iterdir():
            _remove(entry)
            removed.append(entry)

    candidates = [
        entry
        for folder in (settings.datasets_dir, settings.cache_dir / "thumbs")
        if folder.is_dir()
        for entry in folder.iterdir()
        if entry.is_dir()
    ]
    image_caches = [
        entry for entry in settings.cache_dir.iterdir()
        if entry.is_dir() and _IMAGE_CACHE.fullmatch(entry.name)
    ] if settings.cache_dir.is_dir() else []
    # Run ids are never handed out again (migration 0004): a folder named after an id that
    # is not in the database is a deleted run's, not a run still to come.
    run_folders = [
        entry for entry in settings.runs_dir.iterdir()
        if entry.is_dir() and not entry.is_symlink() and re.fullmatch(r"[1-9][0-9]*", entry.name)
    ] if settings.runs_dir.is_dir() else []
    if candidates or image_caches or run_folders:
        if session_factory is None:
            from app.db import get_sessionmaker

            session_factory = get_sessionmaker(settings.sqlalchemy_url)
        try:
            with session_factory() as session:
                rows = session.execute(
                    select(Dataset.id, Dataset.storage_key, Dataset.fingerprint)
                ).all()
                run_ids = set(session.scalars(select(Run.id)))
        except SQLAlchemyError as exc:
            # Without the list of datasets and runs nothing can be called an orphan.
            log.warning("dataset clean-up skipped, the database is not readable: %s", exc)
            return removed
        known = {row.storage_key for row in rows}
        known_caches = {image_cache_dir(settings, row).name for row in rows}
        for entry in candidates:
            if entry.name not in known and stale(entry):
                _remove(entry)
                removed.append(entry)
        for entry in image_caches:
            if entry.name not in known_caches and stale(entry):
                _remove(entry)
                removed.append(entry)
        for entry in run_folders:
            if int(entry.name) in run_ids:  # a model.onnx or checkpoint zip cut short
                removed.extend(remove_abandoned_temporaries(entry))
            elif stale(entry):
                _remove(entry)
                removed.append(entry)
    for path in removed:
        log.warning("removed leftover %s", path)
    return removed
