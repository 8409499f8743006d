"""Trying a finished run's model on a few images of one's own: `POST /api/runs/{id}/predict`.

The images come in one multipart form, are labeled on the web's CPU by the model as plain timm
loads it from the run's export (`worker.selftuning.predict`, as the command line's `predict`
does), and are not kept. The web loads a model once and keeps the last few it loaded; torch is
imported on the first request (or by the background preload, `app.engine_preload`).
"""

from __future__ import annotations

import io
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from PIL import Image
from python_multipart.multipart import parse_options_header

from app.engine_preload import wait_for_preload
from app.ingest import OPEN_FORMATS, SUPPORTED_TEXT, IngestError, MultipartParts
from app.responses import human_bytes
from worker.selftuning.files import MODEL_FILE
from worker.selftuning.pixels import to_rgb

if TYPE_CHECKING:
    import torch

    from worker.selftuning.predict import Exported

MAX_IMAGES = 16  # per request: a handful to look at, not a folder (the CLI labels folders)
MAX_BODY_BYTES = 64 * 1024**2  # the whole form, images and framing
MAX_NAME_CHARS = 200  # of an image's file name as it is answered
TOP_DEFAULT = 5
TOP_MAX = 20
MODELS_KEPT = 2  # loaded models kept for the next request (one per run)


@dataclass(frozen=True)
class SentImage:
    """One image of the form: its file name as sent and its bytes."""

    name: str
    data: bytes


class _ImageParts(MultipartParts):
    """Every part (each in the field `file`) is an image, kept in memory (the body is at most
    MAX_BODY_BYTES)."""

    FIELDS = ("file",)

    def __init__(self, boundary: bytes) -> None:
        super().__init__(boundary)
        self.images: list[SentImage] = []
        self._name = ""  # the file name of the image part being read
        self._data = bytearray()

    def fields_hint(self) -> str:
        return "send each image in a field named 'file' (curl -F file=@cat.jpg ...)"

    def on_part(self, options: dict[bytes, bytes]) -> None:
        if len(self.images) == MAX_IMAGES:
            raise IngestError(f"send at most {MAX_IMAGES} images at a time (the form has more "
                              "'file' fields); label a folder with the command line's predict")
        raw = options.get(b"filename", b"").decode("utf-8", "replace").replace("\\", "/")
        name = PurePosixPath(raw).name[:MAX_NAME_CHARS]
        self._name = name or f"image {len(self.images) + 1}"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]

    def on_part_end(self) -> None:
        self.images.append(SentImage(self._name, bytes(self._data)))
        self._data = bytearray()


def _too_large() -> IngestError:
    return IngestError(f"the images add up to more than {human_bytes(MAX_BODY_BYTES)}: send "
                       "fewer or smaller ones (the model sees them at its own input size)", 413)


async def receive_images(headers: Mapping[str, str], chunks: AsyncIterator[bytes]
                         ) -> list[SentImage]:
    """The images of a multipart form (fields named `file`), in the order sent: a 415 for a
    body that is not multipart, a 413 past MAX_BODY_BYTES, a 422 past MAX_IMAGES or for none."""
    media_type, params = parse_options_header(headers.get("content-type", ""))
    if media_type != b"multipart/form-data" or b"boundary" not in params:
        raise IngestError("send the images as multipart/form-data, each in a field named "
                          "'file' (curl -F file=@cat.jpg -F file=@dog.png ...)", 415)
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    parts = _ImageParts(params[b"boundary"])
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > MAX_BODY_BYTES:
            raise _too_large()
        parts.write(chunk)
    parts.finalize()
    if not parts.images:
        raise IngestError("no image in the form: send each in a field named 'file' "
                          "(curl -F file=@cat.jpg ...)")
    return parts.images


def decode(image: SentImage, max_pixels: int, white_level: int | None) -> Image.Image:
    """The RGB pixels of a sent image as training read its dataset's (`to_rgb`, the first
    frame); a ValueError with the reason for one that does not decode or is over the pixel
    limit (checked on the header, before decoding)."""
    if not image.data:
        raise ValueError("the file is empty")
    try:
        with Image.open(io.BytesIO(image.data), formats=OPEN_FORMATS) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise ValueError(f"{width}x{height} = {width * height:,} pixels, over the limit "
                                 f"of {max_pixels:,} (SELFTUNE_MAX_IMAGE_PIXELS)")
            opened.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return to_rgb(opened, white_level)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a damaged file
        kind = "unsupported" if isinstance(exc, Image.UnidentifiedImageError) else "corrupt"
        raise ValueError(f"not an image this app reads ({kind}; {SUPPORTED_TEXT})") from None


class Models:
    """The models last tried, each loaded once from its run's export (at most `kept`, the one
    used longest ago let go first), and one labeling at a time: torch uses every core for
    one batch already, and the workers train on them too."""

    def __init__(self, kept: int = MODELS_KEPT) -> None:
        self.kept = kept
        self._lock = threading.Lock()
        self._loaded: OrderedDict[tuple[str, int, int], Exported] = OrderedDict()

    def get(self, folder: Path) -> Exported:
        """The model exported in `folder` (config.json and model.safetensors) as plain timm
        loads it; a ValueError when it does not load, an OSError when the files are gone."""
        wait_for_preload()  # one thread imports torch (app.engine_preload)
        import torch

        from worker.selftuning.predict import load_exported

        weights = (folder / MODEL_FILE).stat()
        # A run exported again (its folder rewritten) is loaded again.
        key = (str(folder), weights.st_mtime_ns, weights.st_size)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            for old in [k for k in self._loaded if k[0] == key[0]]:
                del self._loaded[old]
            model = load_exported(folder, torch.device("cpu"))
            self._loaded[key] = model
            while len(self._loaded) > self.kept:
                self._loaded.popitem(last=False)
            return model

    def classify(self, exported: Exported, pixels: list[torch.Tensor], top: int
                 ) -> list[list[tuple[str, float]]]:
        from worker.selftuning.predict import classify

        with self._lock:
            return classify(exported, pixels, top)


MODELS = Models()


@dataclass(frozen=True)
class Labeled:
    """What `label_images` found: each decoded image's most likely classes (at least two, with
    their probabilities) and the others' reasons, by their position in the form."""

    top: dict[int, list[tuple[str, float]]]
    skipped: dict[int, str]
    seconds: float


def label_images(folder: Path, images: list[SentImage], max_pixels: int, top: int,
                 models: Models = MODELS) -> Labeled:
    """Label the images that decode with the model exported in `folder`."""
    began = time.monotonic()
    exported = models.get(folder)
    # Each image as the model sees it, made as soon as it is decoded: a few hundred kB, where
    # the decoded image may be of up to SELFTUNE_MAX_IMAGE_PIXELS (120 MB at 40 M pixels).
    decoded: dict[int, torch.Tensor] = {}
    skipped: dict[int, str] = {}
    for index, image in enumerate(images):
        try:
            decoded[index] = exported.pixels(decode(image, max_pixels, exported.white_level))
        except ValueError as exc:
            skipped[index] = str(exc)
    # Two at least: the margin is the lead on the runner-up.
    answers = models.classify(exported, list(decoded.values()), max(top, 2)) if decoded else []
    return Labeled(dict(zip(decoded, answers, strict=True)), skipped,
                   time.monotonic() - began)
