"""Datasets from folders and archives, label budgets, image decoding and the decode cache."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.engine.helpers import tiny_config, write_shapes_dataset
from worker.selftuning import RunData, load_folder_dataset, make_budget_data, open_rgb, train
from worker.selftuning.images import Preprocessing, decode_all, decode_pool
from worker.selftuning.pixels import white_level_of


def test_folder_dataset_lists_classes_splits_and_unlabeled(shapes_root: Path):
    class_names, train_items, test_items, unlabeled = load_folder_dataset(shapes_root)
    assert class_names == ["circle", "square", "triangle"]
    assert len(train_items) == 30 and len(test_items) == 12 and len(unlabeled) == 4
    assert all(Path(path).parent.name == class_names[label] for path, label in train_items)
    assert all(Path(path).parts[-3] == "test" for path, _ in test_items)


def test_zip_and_tar_archives_give_the_same_dataset(
    shapes_root: Path, tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # archives unpack here
    zip_path = tmp_path / "shapes.zip"
    with zipfile.ZipFile(zip_path, "w") as bundle:
        for file in sorted(shapes_root.rglob("*.png")):
            # A wrapping folder, as zips made by file managers have.
            bundle.write(file, f"shapes/{file.relative_to(shapes_root)}")
    # Some Windows tools write backslashes (the upload reads them as folders; this unpacked
    # files named 'shapes\\train\\circle\\0.png': "found 0 class folder(s)").
    windows_zip = tmp_path / "windows.zip"
    with zipfile.ZipFile(windows_zip, "w") as bundle:
        for file in sorted(shapes_root.rglob("*.png")):
            bundle.write(file, "shapes\\" + "\\".join(file.relative_to(shapes_root).parts))
    tars = []
    for suffix, mode in ((".tar.gz", "w:gz"), (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz")):
        tars.append(tmp_path / f"shapes{suffix}")  # every compression the web takes
        with tarfile.open(tars[-1], mode) as bundle:
            bundle.add(shapes_root, arcname=".")

    expected = load_folder_dataset(shapes_root)
    for archive in (zip_path, windows_zip, *tars):
        class_names, train_items, test_items, unlabeled = load_folder_dataset(archive)
        assert class_names == expected[0]
        assert [(Path(p).name, label) for p, label in train_items] == [
            (Path(p).name, label) for p, label in expected[1]
        ]
        assert len(test_items) == len(expected[2]) and len(unlabeled) == len(expected[3])
    assert len(list((tmp_path / "selftuning-datasets").iterdir())) == 5  # each unpacked once


def test_zip_with_a_path_escaping_the_archive_is_refused(tmp_path: Path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("train/a/x.png", b"")
        bundle.writestr("../../escape.png", b"")
    with pytest.raises(ValueError, match="escapes the archive"):
        load_folder_dataset(archive)
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("train/a/x.png", b"")
        bundle.writestr("..\\..\\escape.png", b"")
    with pytest.raises(ValueError, match="escapes the archive"):
        load_folder_dataset(archive)
    assert not (tmp_path.parent / "escape.png").exists()


def _write_images(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / name)


@pytest.mark.parametrize("top", ["val", "Test"])
def test_a_folder_that_is_one_test_split_alone_is_looked_through_as_uploads_do(
    tmp_path: Path, top: str,
):
    _write_images(tmp_path / "upload" / top, ["ant/a.png", "ant/b.png", "bee/c.png",
                                              "bee/d.png", "unlabeled/e.png"])
    class_names, train_items, test_items, unlabeled = load_folder_dataset(tmp_path / "upload")
    assert class_names == ["ant", "bee"]
    assert [label for _, label in train_items] == [0, 0, 1, 1]
    assert test_items == []  # nothing to train on were it the test split: the caller holds out
    assert [Path(path).name for path in unlabeled] == ["e.png"]


def test_labels_csv_gives_the_classes_not_the_folders(tmp_path: Path):
    photos = tmp_path / "upload" / "photos"  # a wrapping folder, looked through
    _write_images(photos, ["batch1/a.png", "batch1/b.png", "batch2/c.png", "batch2/d.png",
                           "batch2/e.png", "batch2/not_listed.png"])
    (photos / "labels.csv").write_text(
        "path,label\nbatch2/e.png,dog\nbatch1/a.png,cat\nbatch1/b.png,dog\n"
        "batch2/c.png,cat\nbatch2/d.png,\n")

    class_names, train_items, test_items, unlabeled = load_folder_dataset(tmp_path / "upload")

    assert class_names == ["cat", "dog"]
    assert [(Path(path).relative_to(photos).as_posix(), label)
            for path, label in train_items] == [
        ("batch1/a.png", 0), ("batch2/c.png", 0), ("batch1/b.png", 1), ("batch2/e.png", 1)]
    assert test_items == []  # no split column: the caller holds some out
    assert unlabeled == [str(photos / "batch2" / "d.png")]


def test_a_labels_csv_that_relabels_class_folders_is_read_as_it_says_with_a_warning(
    tmp_path: Path,
):
    """As an upload says it: cat/ and dog/ with a labels.csv that swapped them took the CSV's
    labels without a word."""
    _write_images(tmp_path, ["cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png", "loose/e.png"])
    (tmp_path / "labels.csv").write_text(
        "path,label\ncat/a.png,dog\ncat/b.png,cat\ndog/c.png,cat\ndog/d.png,\nloose/e.png,dog\n")
    warnings: list[str] = []
    class_names, train_items, _, unlabeled = load_folder_dataset(tmp_path, warnings=warnings)
    assert class_names == ["cat", "dog"]
    assert sorted((Path(path).name, label) for path, label in train_items) == [
        ("a.png", 1), ("b.png", 0), ("c.png", 0), ("e.png", 1)]  # the CSV's labels
    assert [Path(path).name for path in unlabeled] == ["d.png"]
    assert warnings == [
        f"3 images are in a class's folder but labeled another class or none by "
        f"{tmp_path / 'labels.csv'} ('cat/a.png' as 'dog', 'dog/c.png' as 'cat', 'dog/d.png' "
        f"as unlabeled): its labels are used; if the folders are right, remove "
        f"{tmp_path / 'labels.csv'} and run again"]
    agreeing: list[str] = []
    (tmp_path / "labels.csv").write_text("path,label\ncat/a.png,cat\ndog/c.png,dog\n")
    load_folder_dataset(tmp_path, warnings=agreeing)
    assert agreeing == []


def test_labels_csv_without_header_and_with_a_split_column_reads_as_the_web_does(
    tmp_path: Path,
):
    _write_images(tmp_path, ["a.png", "b.png", "c.png", "d.png", "e.png"])
    (tmp_path / "labels.csv").write_text("a.png,cat\nb.png,dog\nc.png,cat,test\n"
                                         "d.png,dog,VAL\ne.png,\n")
    class_names, train_items, test_items, unlabeled = load_folder_dataset(tmp_path)
    assert class_names == ["cat", "dog"]
    assert train_items == [(str(tmp_path / "a.png"), 0), (str(tmp_path / "b.png"), 1)]
    assert test_items == [(str(tmp_path / "c.png"), 0), (str(tmp_path / "d.png"), 1)]
    assert unlabeled == [str(tmp_path / "e.png")]


def test_labels_csv_paths_keep_their_spaces_where_such_a_file_exists(tmp_path: Path):
    """A file named with a space around it (this app's download writes its path so) is found
    as written; a path typed with spaces around it (`b.png ,`) is read without them."""
    _write_images(tmp_path, [" dog/a.png", "b.png", "d.png"])
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png ", format="PNG")
    (tmp_path / "labels.csv").write_text(
        '" dog/a.png",dog\n  b.png , cat\n"c.png ", dog \nd.png,cat\n')
    class_names, train_items, _, _ = load_folder_dataset(tmp_path)
    assert class_names == ["cat", "dog"]
    assert sorted(train_items) == sorted([
        (str(tmp_path / " dog" / "a.png"), 1), (str(tmp_path / "b.png"), 0),
        (str(tmp_path / "c.png "), 1), (str(tmp_path / "d.png"), 0)])


def test_labels_csv_written_on_windows_reads_as_the_web_does(tmp_path: Path):
    """Backslashes separate folders, as uploads read them; classes number naturally."""
    _write_images(tmp_path, ["img/a.png", "img/b.png", "img/c.png", "img/d.png"])
    (tmp_path / "labels.csv").write_text(
        "img\\a.png,class10\nimg\\b.png,class2\nimg\\c.png,class10,test\nimg/d.png,\n")
    class_names, train_items, test_items, unlabeled = load_folder_dataset(tmp_path)
    assert class_names == ["class2", "class10"]
    assert train_items == [(str(tmp_path / "img" / "b.png"), 0),
                           (str(tmp_path / "img" / "a.png"), 1)]
    assert test_items == [(str(tmp_path / "img" / "c.png"), 1)]
    assert unlabeled == [str(tmp_path / "img" / "d.png")]


def test_labels_csv_rows_that_are_not_images_are_left_out_with_the_reason(tmp_path: Path):
    """As an upload leaves them out: a listed text file, an image that does not open, and
    one whose data is cut short (its header opened, so it was kept: the run then stopped
    at decoding it, where an upload skips it)."""
    _write_images(tmp_path / "data", ["a.png", "b.png", "c.png"])
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n and then nothing")
    whole = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(whole, "JPEG")
    (tmp_path / "data" / "e.jpg").write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2])
    (tmp_path / "data" / "labels.csv").write_text(
        "path,label\na.png,cat\nb.png,dog\nc.png,dog\nnotes.txt,dog\nd.png,cat\ne.jpg,cat\n")
    skipped: dict[str, str] = {}
    class_names, train, _, _ = load_folder_dataset(tmp_path / "data", skipped)
    assert class_names == ["cat", "dog"]
    assert sorted(Path(path).name for path, _ in train) == ["a.png", "b.png", "c.png"]
    assert {Path(path).name: reason.split(" (")[0] for path, reason in skipped.items()} == {
        "notes.txt": "not an image", "d.png": "corrupt or unsupported image",
        "e.jpg": "corrupt or unsupported image"}
    assert "truncated" in skipped[str(tmp_path / "data" / "e.jpg")]


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("path,label\na.png,cat\nb.png,dog\nmissing.png,dog\n",
         "line 4: 'missing.png' does not exist"),
        ("path,label\na.png,cat\nb.png,dog\n./a.png,dog\n", "line 4: './a.png' is listed twice"),
        ("path,label\na.png,cat\n../b.png,dog\n", "must be relative to the folder of labels.csv"),
        ("path,label\na.png,cat\n..\\b.png,dog\n", "must be relative to the folder of labels.csv"),
        ("path,label\na.png,cat\nC:\\b.png,dog\n", "must be relative to the folder of labels.csv"),
        ("file,class\na.png,cat\nb.png,dog\n", "line 1: 'file' does not exist in "),
        ("file,class\na.png,cat\nb.png,dog\n", "a header line must be 'path,label' (or"),
        ("path,label\na.png,cat,dog,x\n", "line 2: expected 'path,label' (or"),
        # Columns the wrong way round: with the header, and without (was "'cat' is listed
        # twice" alone).
        ("Label,Path\ncat,a.png\ndog,b.png\n",
         "line 1: the columns are 'label,path': write the path first, then the label (each "
         "line is 'path,label' or 'path,label,split')"),
        ("cat,a.png\ndog,b.png\ncat,c.png\n",
         "line 3: 'cat' is listed twice; the label 'c.png' reads like an image's path: are the "
         "columns swapped? (each line is 'path,label' or 'path,label,split')"),
        ("path,label\na.png,cat\nb.png,dog,holdout\n",
         "line 3: split 'holdout' must be train, test or val"),
        ("path,label\na.png,cat\nb.png,dog\nc.png,,test\n",
         "line 4: 'c.png' is in the test split without a label"),
        ("path,label\na.png,cat\nb.png,cat\nc.png,\n",
         "found 1 class(es) with training images ('cat'); need at least two"),
        ("path,label\na.png,cat\nb.png,dog\nc.png,bird,val\n",
         "'bird' only in the test split"),
    ],
    ids=["missing", "twice", "escaping", "escaping-backslash", "drive",
         "other-header", "other-header-hint", "columns", "swapped-header", "swapped",
         "bad-split", "unlabeled-test", "one-class",
         "class-only-tested"],
)
def test_labels_csv_mistakes_are_refused_with_what_to_fix(tmp_path: Path, csv_text, message):
    _write_images(tmp_path / "data", ["a.png", "b.png", "c.png"])
    (tmp_path / "b.png").write_bytes((tmp_path / "data" / "b.png").read_bytes())
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "labels.csv").write_text(csv_text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_folder_dataset(tmp_path / "data")


def _truncated_zip(shapes_root: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for file in sorted(shapes_root.rglob("*.png")):
            bundle.write(file, file.relative_to(shapes_root).as_posix())
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _tar_cut_where_an_entry_ends(shapes_root: Path) -> bytes:
    """A tar whose second half of entries is gone, cut where one begins: tarfile reads the
    first half without an error."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as bundle:
        for file in sorted(shapes_root.rglob("*.png")):
            bundle.add(file, file.relative_to(shapes_root).as_posix())
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as bundle:
        members = bundle.getmembers()
    return buffer.getvalue()[:members[len(members) // 2].offset]


def _tar_with_link_out() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        link = tarfile.TarInfo("train/a/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        bundle.addfile(link)
    return buffer.getvalue()


def _zip_escaping() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("train/a/x.png", b"")
        bundle.writestr("../../escape.png", b"")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("photos.zip", lambda root: b"not a zip at all", "not a readable .zip"),
        ("photos.zip", _truncated_zip, "not a readable .zip"),
        ("photos.tar.gz", lambda root: gzip.compress(b"garbage"), "not a readable .tar"),
        ("photos.tar.gz", lambda root: _tar_with_link_out()[:40], "not a readable .tar"),
        ("photos.tar", _tar_cut_where_an_entry_ends, "is damaged or truncated (cut short by "
         "an incomplete download?): it ends without the end-of-archive block"),
        ("photos.tar.gz", lambda root: _tar_with_link_out(), "link to an absolute path"),
        ("photos.zip", lambda root: _zip_escaping(), "escapes the archive"),
        ("photos.tar.bz2", lambda root: b"BZh9" + b"garbage" * 10, "not a readable .tar"),
        ("photos.tar.xz", lambda root: lzma.compress(_tar_with_link_out())[:60],
         "not a readable .tar"),
    ],
    ids=["not-a-zip", "truncated-zip", "not-a-tar", "truncated-tar", "tar-cut-between-entries",
         "link-out", "escaping",
         "not-a-tar-bz2", "truncated-tar-xz"],
)
def test_damaged_or_unsafe_archives_are_refused_and_leave_no_staging_folder(
    shapes_root: Path, tmp_path: Path, monkeypatch, name, make, message
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    archive = tmp_path / name
    archive.write_bytes(make(shapes_root))
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        load_folder_dataset(archive)
    assert name in str(refused.value)
    assert list((tmp_path / "tmp" / "selftuning-datasets").iterdir()) == []


def _archive_of_zeros(path: Path, megabytes: int) -> Path:
    """A dataset archive that unpacks to `megabytes` MiB from a few KiB (a photo of zeros)."""
    payload = bytes(megabytes * 2**20)
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
            bundle.writestr("cats/a.bmp", payload)
    else:
        with tarfile.open(path, "w:gz") as bundle:
            member = tarfile.TarInfo("cats/a.bmp")
            member.size = len(payload)
            bundle.addfile(member, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("name", ["zeros.zip", "zeros.tar.gz"])
def test_an_archive_the_temp_folder_has_no_room_for_is_refused_before_it_is_unpacked(
    tmp_path: Path, monkeypatch, name
):
    # The temp folder's disk is said to have 8 MiB free (a real disk cannot be filled in a
    # test); unpacking writes through the real file system.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    archive = _archive_of_zeros(tmp_path / name, 16)
    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: real_disk_usage(folder)._replace(
        free=8 * 2**20))
    with pytest.raises(ValueError, match="needs more than 16 MiB unpacked and the temp "
                                         "folder .* has 8 MiB free") as refused:
        load_folder_dataset(archive)
    assert str(archive) in str(refused.value) and "TMPDIR" in str(refused.value)
    assert list((tmp_path / "tmp" / "selftuning-datasets").iterdir()) == []

    small = _archive_of_zeros(tmp_path / name.replace("zeros", "small"), 1)
    with pytest.raises(ValueError, match="found 0 class folder"):
        load_folder_dataset(small)  # unpacked (it fits), then found to hold no usable image
    assert len(list((tmp_path / "tmp" / "selftuning-datasets").iterdir())) == 1


def test_copies_of_archives_gone_or_changed_are_removed_once_unused_for_a_week(
    shapes_root: Path, tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    copies = tmp_path / "tmp" / "selftuning-datasets"
    archives = {}
    for name in ("kept", "changed", "gone", "changed-lately"):
        archives[name] = tmp_path / f"{name}.tar"
        with tarfile.open(archives[name], "w") as bundle:
            bundle.add(shapes_root, arcname=".")
        load_folder_dataset(archives[name])
    copy_of = {name: copies / next(
        entry.name for entry in copies.iterdir()
        if json.loads((entry / ".complete").read_text())["path"] == str(archive.resolve())
    ) for name, archive in archives.items()}
    staging_left = copies / "0123456789abcdef-killed"  # what a killed unpack leaves
    (staging_left / "train").mkdir(parents=True)
    old_copy = copies / "fedcba9876543210"  # unpacked before copies named their archive
    (old_copy / "train").mkdir(parents=True)
    (old_copy / ".complete").touch()

    a_week_ago = time.time() - 7 * 24 * 3600 - 60
    for marker in [copy_of[name] / ".complete" for name in ("kept", "changed", "gone")]:
        os.utime(marker, (a_week_ago, a_week_ago))
    for folder in (staging_left, old_copy / ".complete"):
        os.utime(folder, (a_week_ago, a_week_ago))
    for name in ("changed", "changed-lately"):
        with archives[name].open("ab") as handle:
            handle.write(bytes(10240))  # still a tar, with another size
    archives["gone"].unlink()

    load_folder_dataset(archives["changed"])  # a new copy of the changed archive
    left = {entry.name for entry in copies.iterdir()}
    assert copy_of["kept"].name in left  # its archive is as it was, however old the copy
    assert copy_of["changed-lately"].name in left  # changed, but used within the week
    assert not {copy_of["changed"].name, copy_of["gone"].name, staging_left.name,
                old_copy.name} & left
    assert len(left) == 3  # and the changed archive's new copy

    # A copy in use is marked so: a run of "kept" keeps it fresh.
    load_folder_dataset(archives["kept"])
    assert time.time() - (copy_of["kept"] / ".complete").stat().st_mtime < 60


def test_budgets_are_class_balanced_nested_and_hide_the_rest(tmp_path: Path):
    root = write_shapes_dataset(tmp_path / "d", train_per_class=20, unlabeled=3)
    class_names, train_items, test_items, unlabeled = load_folder_dataset(root)
    chosen = {}
    for fraction in (0.15, 0.3, 0.5):
        data, info = make_budget_data(class_names, train_items, test_items, unlabeled,
                                      fraction, seed=7)
        chosen[fraction] = {path for path, _ in data.labeled}
        assert info["labeled_per_class"] == [round(20 * fraction)] * 3
        assert len(data.labeled) + info["hidden_label_count"] == len(train_items)
        hidden = [item for item in data.unlabeled if item[1] is not None]
        assert {path for path, _ in hidden} | chosen[fraction] == {p for p, _ in train_items}
        assert sum(1 for _, label in data.unlabeled if label is None) == 3
    assert chosen[0.15] < chosen[0.3] < chosen[0.5]
    other_seed, _ = make_budget_data(class_names, train_items, test_items, unlabeled, 0.15, 8)
    assert {p for p, _ in other_seed.labeled} != chosen[0.15]
    tiny, info = make_budget_data(class_names, train_items, test_items, unlabeled, 0.001, 7)
    assert info["labeled_per_class"] == [1, 1, 1]


def test_a_count_per_class_over_every_class_is_told_apart_from_one_that_fits():
    """The check the web and the command line both refuse a budget with."""
    from worker.selftuning.budgets import Budget

    sizes = [3, 8, 5]
    assert Budget(per_class=9).over_every_class(sizes)
    assert not Budget(per_class=8).over_every_class(sizes)  # the largest class fits it
    assert not Budget(fraction=1e-6).over_every_class(sizes)
    assert not Budget().over_every_class(sizes)  # "all"
    assert not Budget(per_class=9).over_every_class([])  # nothing to compare with


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("photo.jpg", lambda: _save(Image.new("RGB", (40, 30), (200, 10, 10)), "JPEG")),
        ("gray.png", lambda: _save(Image.new("L", (30, 40), 128), "PNG")),
        ("alpha.png", lambda: _save(Image.new("RGBA", (32, 32), (0, 255, 0, 100)), "PNG")),
        ("pic.webp", lambda: _save(Image.new("RGB", (33, 31), (0, 0, 250)), "WEBP")),
        ("pic.bmp", lambda: _save(Image.new("RGB", (20, 50), (9, 9, 9)), "BMP")),
        ("deep.tiff", lambda: _save(Image.fromarray(
            np.full((30, 30), 40000, dtype=np.uint16)), "TIFF")),
        ("anim.gif", lambda: _save(Image.new("P", (30, 30), 3), "GIF", save_all=True,
                                   append_images=[Image.new("P", (30, 30), 7)])),
        ("cmyk.jpg", lambda: _save(Image.new("CMYK", (30, 30), (0, 100, 100, 0)), "JPEG")),
    ],
)
def test_every_supported_format_decodes_to_rgb(tmp_path: Path, name, make):
    path = tmp_path / name
    path.write_bytes(make())
    image = open_rgb(path)
    assert image.mode == "RGB"
    pixels = decode_all([str(path)], "eval", Preprocessing(24, (0.5,) * 3, (0.5,) * 3))
    assert pixels.array.shape == (1, 24, 24, 3) and pixels.array.dtype == np.uint8
    if name == "deep.tiff":  # 16-bit scaled down, not clipped to white
        assert 150 < int(np.asarray(image)[0, 0, 0]) < 160


def test_corrupt_image_names_the_file(tmp_path: Path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        decode_all([str(path)], "train", Preprocessing(24, (0.5,) * 3, (0.5,) * 3))


def test_decoded_cache_is_reused_from_disk(shapes_data, tmp_path: Path, monkeypatch):
    import worker.selftuning.images as images

    paths = [path for path, _ in shapes_data.labeled]
    preprocessing = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    first = decode_all(paths, "train", preprocessing, tmp_path)
    assert first.path is not None and first.path.is_file()

    def fail(*_args, **_kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images, "open_rgb", fail)
    second = decode_all(paths, "train", preprocessing, tmp_path)
    assert np.array_equal(np.asarray(first.array), np.asarray(second.array))
    assert first.array.shape == (len(paths), preprocessing.scale_size,
                                 preprocessing.scale_size, 3)


def test_runs_on_other_budgets_and_seeds_share_one_decoded_pool(
    shapes_root: Path, tmp_path: Path, monkeypatch
):
    import pickle

    import worker.selftuning.images as images

    class_names, train_items, test_items, unlabeled = load_folder_dataset(shapes_root)
    splits = [make_budget_data(class_names, train_items, test_items, unlabeled, budget,
                               seed=seed)[0]
              for budget, seed in (({"per_class": 2}, 0), ({"per_class": 4}, 1), ("all", 0))]
    preprocessing = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)

    def parts(data: RunData) -> list[list[str]]:
        return [[path for path, _ in data.labeled], [path for path, _ in data.unlabeled]]

    first = decode_pool(parts(splits[0]), "train", preprocessing, tmp_path)
    monkeypatch.setattr(images, "open_rgb", lambda *_args, **_kwargs: pytest.fail("decoded"))
    later = [decode_pool(parts(data), "train", preprocessing, tmp_path) for data in splits[1:]]
    monkeypatch.undo()

    # One file holds the whole pool; each run's subsets are selections of it, in their order.
    assert len(list(tmp_path.glob("*.npy"))) == 1
    for data, selections in zip(splits, [first, *later], strict=True):
        for paths, selection in zip(parts(data), selections, strict=True):
            alone = decode_all(paths, "train", preprocessing).array
            assert len(selection) == len(paths)
            assert np.array_equal(selection.array, alone)
            assert all(np.array_equal(selection[row], alone[row]) for row in range(len(paths)))
            assert np.array_equal(selection[1:3], alone[1:3])
            # DataLoader workers get the selection by path, not the pool's pixels.
            sent = pickle.loads(pickle.dumps(selection))
            assert len(pickle.dumps(selection)) < 4096
            assert np.array_equal(sent.array, alone)


def test_a_second_run_on_another_budget_writes_no_new_decoded_images(
    shapes_root: Path, tmp_path: Path
):
    class_names, train_items, test_items, unlabeled = load_folder_dataset(shapes_root)
    cache = tmp_path / "cache"
    for budget, seed in (({"per_class": 2}, 0), ({"per_class": 4}, 1)):
        data, _ = make_budget_data(class_names, train_items, test_items, unlabeled, budget,
                                   seed=seed)
        train(tiny_config(iterations=2, seed=seed), data, tmp_path / f"run-{seed}",
              cache_dir=cache)
        # Training squares and eval crops of the training pool, eval crops of the test set.
        assert sorted(path.name.split("-")[0] for path in cache.glob("*.npy")) == [
            "eval", "eval", "train"]


def _gray16(path: Path, values: np.ndarray) -> str:
    Image.fromarray(values.astype(np.uint16)).save(path)
    return str(path)


def test_the_white_level_is_the_datasets_not_each_images(tmp_path: Path):
    """12-bit cameras write 16-bit files whose values end at 4095: read as 16-bit values
    (divided by 257) they were nearly black. The fewest bits holding the brightest value of
    any image decide, so a dark image stays darker than a bright one."""
    bright = _gray16(tmp_path / "bright.png", np.full((8, 8), 4095))
    dark = _gray16(tmp_path / "dark.png", np.full((8, 8), 1000))
    plain = str(tmp_path / "plain.png")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(plain)
    assert white_level_of([plain]) is None
    assert white_level_of([plain, dark]) == 1023
    assert white_level_of([plain, dark, bright]) == 4095
    assert white_level_of([dark, _gray16(tmp_path / "deep.png", np.full((8, 8), 40000))]) == 65535

    def brightness(path: str, white_level: int | None) -> int:
        return int(np.asarray(open_rgb(path, white_level=white_level))[0, 0, 0])

    assert brightness(bright, 4095) == 255 and brightness(dark, 4095) == 62
    assert brightness(bright, None) == 16  # what it was: 4095 / 257
    assert brightness(plain, 4095) == 10  # 8-bit images as they are
    eval_pixels = decode_all([bright, dark], "eval", Preprocessing(
        8, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0, white_level=4095)).array
    assert eval_pixels[:, 0, 0, 0].tolist() == [255, 62]


def test_floating_point_images_of_0_to_1_are_scaled_to_white(tmp_path: Path):
    """TIFFs of 32-bit floats hold 0-1 as a rule: read as 8-bit values they trained black
    (and showed black), with no word of it."""
    paths = []
    for n, top in enumerate((1.0, 0.5)):
        paths.append(str(tmp_path / f"{n}.tif"))
        Image.fromarray(np.linspace(0, top, 64, dtype=np.float32).reshape(8, 8)).save(paths[-1])
    assert Image.open(paths[0]).mode == "F"
    assert white_level_of(paths) == 1
    assert np.asarray(open_rgb(paths[0], white_level=1))[-1, -1].tolist() == [255, 255, 255]
    assert np.asarray(open_rgb(paths[1], white_level=1))[-1, -1].tolist() == [128, 128, 128]
    masks = _gray16(tmp_path / "mask.png", np.eye(8))  # 16-bit 0/1 masks: black before too
    assert white_level_of([masks]) == 1


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_float_images_marking_no_data_with_nan_or_infinity_have_a_white_level(
        tmp_path: Path, poison: float):
    """A run works out its images' white level at its start: math.ceil of NaN or of an
    infinity failed it ("cannot convert float NaN to integer")."""
    paths = []
    for n in range(3):
        values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
        values[0, 0] = poison if n == 0 else 0
        paths.append(str(tmp_path / f"{n}.tif"))
        Image.fromarray(values).save(paths[-1])
    assert white_level_of(paths) == 1
    pixels = np.asarray(open_rgb(paths[0], white_level=1))
    assert pixels[0, 0, 0] == (255 if poison == float("inf") else 0)  # NaN reads black
    assert pixels[-1, -1].tolist() == [255, 255, 255]


def test_a_run_on_12_bit_images_trains_on_them_scaled_by_their_white_level(tmp_path: Path):
    rng = np.random.default_rng(0)

    def items(split: str, count: int) -> list[tuple[str, int]]:
        folder = tmp_path / split
        folder.mkdir()
        return [(_gray16(folder / f"{label}-{n}.png",
                         rng.integers(0, 2048, (40, 40)) + 2047 * label), label)
                for label in (0, 1) for n in range(count)]

    data = RunData(class_names=["dim", "lit"], labeled=items("train", 4),
                   unlabeled=[(path, None) for path, _ in items("unlabeled", 2)],
                   test=items("test", 2))
    out = tmp_path / "out"
    train(tiny_config(iterations=2), data, out)
    training = json.loads((out / "training.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert training["input_white_level"] == config["input_white_level"] == 4095
    # 8-bit data exports no white level: config.json stays timm's own.
    plain = tmp_path / "plain"
    for split in ("train", "test"):
        (plain / split).mkdir(parents=True)
    eight_bit = RunData(class_names=["a", "b"], test=[], labeled=[])
    for label, colour in enumerate(((20, 20, 20), (200, 200, 200))):
        for split, target in (("train", eight_bit.labeled), ("test", eight_bit.test)):
            for n in range(2):
                path = plain / split / f"{label}-{n}.png"
                Image.new("RGB", (40, 40), colour).save(path)
                target.append((str(path), label))
    train(tiny_config(iterations=2, method="fine-tune"), eight_bit, tmp_path / "out-8")
    assert "input_white_level" not in json.loads((tmp_path / "out-8" / "config.json").read_text())
    assert json.loads((tmp_path / "out-8" / "training.json").read_text())[
        "input_white_level"] is None


def test_files_a_labels_csv_does_not_list_are_skipped_and_named_as_an_upload_names_them(
        tmp_path: Path):
    """With a labels.csv, the images it did not list were left out without a word (an
    upload skips them and says so), and so were hidden files beside them."""
    folder = tmp_path / "listed"
    (folder / "imgs").mkdir(parents=True)
    for index, name in enumerate(["a.png", "b.png", "c.png", "d.png", "not_listed.png"]):
        Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(folder / "imgs" / name)
    (folder / "imgs" / ".thumbs.db").write_bytes(b"\0")
    (folder / "labels.csv").write_text(
        "path,label\nimgs/a.png,cat\nimgs/b.png,cat\nimgs/c.png,dog\nimgs/d.png,dog\n")
    skipped: dict[str, str] = {}
    class_names, train_items, _, _ = load_folder_dataset(folder, skipped)
    assert class_names == ["cat", "dog"] and len(train_items) == 4
    assert skipped == {str(folder / "imgs" / "not_listed.png"): "not listed in labels.csv",
                       str(folder / "imgs" / ".thumbs.db"): "hidden file or folder"}


def test_a_zips_macos_metadata_and_stray_files_are_reported_as_an_upload_reports_them(
        tmp_path: Path, monkeypatch):
    """A zip's __MACOSX/ entries were never unpacked, so never reported (an upload lists
    them), and a stray file that is not an image was said to be outside the class folders
    (an upload says first that it is not an image)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # archives unpack here
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for name, colour in (("cat/1.png", 0), ("cat/2.png", 60), ("dog/1.png", 120),
                             ("dog/2.png", 180)):
            image = io.BytesIO()
            Image.new("RGB", (8, 8), (colour, 0, 0)).save(image, "PNG")
            bundle.writestr(f"train/{name}", image.getvalue())
        bundle.writestr("__MACOSX/train/cat/._1.png", b"\0\5\26\7")
        bundle.writestr("train/README.txt", "my cats and dogs")
    skipped: dict[str, str] = {}
    load_folder_dataset(archive, skipped)
    assert sorted((Path(path).name, reason) for path, reason in skipped.items()) == [
        ("._1.png", "macOS metadata (__MACOSX)"),
        ("README.txt", "not an image (.txt); supported: JPEG, PNG, WebP, BMP, TIFF or GIF")]
