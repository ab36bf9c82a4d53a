"""Images a live edit service request names or uploads, checked before the model sees them.

A request gives its image as ``image``, a path inside the service's image root, or as ``image_b64``, the file's
bytes in base64. Either way the result is a :class:`LiveImage` (decoded to RGB, with the SHA-256 of its bytes) or a
:class:`BadImage` whose message says what to fix:

* a path is resolved (``..`` and symlinks followed) and must land inside the root: ``../x.png``, an absolute path
  elsewhere and a symlink that points out are refused alike, before the file is looked at; a missing file, a folder
  or a file PIL cannot decode is refused too;
* uploaded bytes must decode as base64 (a ``data:image/...;base64,`` prefix is allowed), stay within
  ``max_bytes`` and hold an image PIL can decode, of at most ``max_pixels`` pixels.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

#: uploads (and files under the root) larger than this are refused
MAX_IMAGE_BYTES = 8 * 2**20
#: decoded images with more pixels than this are refused (a decompression bomb is small on the wire)
MAX_PIXELS = 25_000_000


class BadImage(ValueError):
    """A request's image cannot be used; the message names the field and says what to fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LiveImage:
    """An image of a request: decoded, its bytes' hash, and where it came from.

    ``label``: the path the request gave, ``None`` for an upload; ``data``: the uploaded bytes (the service keeps
    them beside its journal), ``None`` for a path; ``suffix``: the file suffix of the uploaded format.
    """

    image: Image.Image
    sha256: str
    label: str | None = None
    data: bytes | None = None
    suffix: str = ".png"


class ImageSource:
    """Turns a request's ``image`` / ``image_b64`` into a :class:`LiveImage`.

    Args:
        root: the image root that ``image`` paths are relative to; ``None``: only uploads are taken.
        max_bytes: the largest image file or upload accepted, in bytes.
        max_pixels: the largest decoded image accepted, in pixels.
    """

    def __init__(self, root: Path | None, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_PIXELS) -> None:
        self.root = Path(root).resolve() if root is not None else None
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def from_request(self, image: str | None, image_b64: str | None, required: bool) -> LiveImage | None:
        """The request's image, or ``None`` when it gives none and ``required`` is false."""
        if image is not None and image_b64 is not None:
            raise BadImage("give the image once: either 'image' (a path under the image root) or 'image_b64'")
        if image is not None:
            return self.from_path(image)
        if image_b64 is not None:
            return self.from_base64(image_b64)
        if required:
            raise BadImage("an edit needs an image: give 'image' (a path under the image root) or 'image_b64'")
        return None

    def from_path(self, given: str) -> LiveImage:
        if self.root is None:
            raise BadImage("field 'image': this service has no image root (--image-root); send the bytes as image_b64")
        if not given.strip() or "\x00" in given:
            raise BadImage("field 'image': give a file path relative to the image root")
        path = Path(given)
        resolved = (path if path.is_absolute() else self.root / path).resolve()  # follows '..' and symlinks
        if not resolved.is_relative_to(self.root):
            raise BadImage(f"field 'image': {given!r} is outside the image root; give a path inside it")
        if not resolved.is_file():
            raise BadImage(f"field 'image': image file not found: {given!r} (paths are relative to the image root)")
        size = resolved.stat().st_size
        if size > self.max_bytes:
            raise BadImage(f"field 'image': {given!r} has {size} bytes, more than the limit of {self.max_bytes}", 413)
        data = resolved.read_bytes()
        image, _ = self._decode(data, f"field 'image': {given!r}")
        return LiveImage(image, hashlib.sha256(data).hexdigest(), given)

    def from_base64(self, text: str) -> LiveImage:
        if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
            text = text.split(",", 1)[1]
        if len(text) > 4 * (self.max_bytes // 3 + 1) + 4:  # more bytes than the limit, whatever they decode to
            raise BadImage(f"field 'image_b64': the image is larger than the limit of {self.max_bytes} bytes", 413)
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadImage(
                f"field 'image_b64': not valid base64 ({exc}); send the image file's bytes base64-encoded"
            ) from exc
        if len(data) > self.max_bytes:
            raise BadImage(f"field 'image_b64': the image is larger than the limit of {self.max_bytes} bytes", 413)
        image, kind = self._decode(data, "field 'image_b64'")
        suffix = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}.get(kind, ".img")
        return LiveImage(image, hashlib.sha256(data).hexdigest(), None, data, suffix)

    def _decode(self, data: bytes, what: str) -> tuple[Image.Image, str]:
        """The image in ``data`` as RGB, fully decoded (a truncated file fails here, not in the model), and its
        format (``PNG``, ``JPEG``, ...)."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > self.max_pixels:
                    raise BadImage(
                        f"{what}: {image.width} x {image.height} pixels, more than the limit of {self.max_pixels}",
                        413,
                    )
                image.load()
                return image.convert("RGB"), image.format or ""
        except BadImage:
            raise
        except Image.UnidentifiedImageError as exc:
            raise BadImage(f"{what}: not an image file; send a PNG or JPEG") from exc
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise BadImage(f"{what}: not an image PIL can read ({exc}); send a PNG or JPEG file") from exc
