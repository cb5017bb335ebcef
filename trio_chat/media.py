"""Images: what an upload or a ``chat_img`` frame may contain, cleaned, thumbnailed and
stored once; a ``chat_img`` message carries a reference to it, never the bytes.

Owns image validation (sans-IO, :func:`validate_image`: bytes in, a cleaned image
and its thumbnail out, or an :class:`ImageError`), data URLs, and turning a
``chat_img`` draft into one that points at a stored image. Runs no tasks;
Pillow's decoding and encoding run in a worker thread, so a large image never
blocks the event loop, and at most ``media.decodeConcurrency`` at once, so their
memory is bounded: a decode holds the image once (4 bytes a pixel), twice while a
JPEG is turned upright.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import io
import logging
import re
import secrets
import struct
import sys
import warnings

import attrs
import trio
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import MediaConfig
from .protocol import Draft, FrameError, utc_after, utc_now
from .store import MediaInfo, Repository, StoredMedia

# What may be uploaded: Pillow's format name -> content type.
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif",
           "WEBP": "image/webp"}
# The thumbnail's format for each: JPEG stays JPEG, GIF becomes PNG (one frame).
_THUMBNAIL_FORMAT = {"PNG": "PNG", "JPEG": "JPEG", "GIF": "PNG", "WEBP": "WEBP"}
# Image metadata kept when re-encoding: what rendering needs, nothing about the author
# (EXIF, XMP, text chunks and comments are dropped).
_KEPT_INFO = ("transparency", "background")
# Markup that makes a file something else too when a browser or a server sniffs it.
_MARKUP = re.compile(rb"<(?:script|html|body|svg|iframe|\?php)", re.IGNORECASE)
_DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+)?(;[a-z0-9=.+-]+)*;base64,", re.IGNORECASE)
log = logging.getLogger(__name__)

_MEDIA_PATH = re.compile(r"(?:https?://[^/\s]+)?/media/([A-Za-z0-9_-]{16,64})\Z")
# Image decodes running at once in this process (media.decodeConcurrency, set by
# configure_decoding): each holds up to 8 bytes a pixel, so this bounds the peak.
_DECODERS = trio.CapacityLimiter(1)
# glibc keeps what a large decode freed in the worker thread's arena; trimming after
# each decode gives it back, so a burst of uploads leaves no high-water mark.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if sys.platform == "linux" \
    else None


class ImageError(Exception):
    """An image that is refused: ``code`` and ``detail`` for the client, ``status`` for
    the HTTP answer."""

    def __init__(self, code: str, detail: str, status: int) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status


@attrs.frozen
class ProcessedImage:
    data: bytes
    content_type: str
    width: int
    height: int
    thumbnail: bytes
    thumbnail_type: str
    thumbnail_width: int
    thumbnail_height: int


def _trailing_data(data: bytes, fmt: str) -> bool:
    """Whether bytes follow the end of the image (how polyglots are usually made)."""
    if fmt == "PNG":
        at = 8
        while at + 8 <= len(data):
            length: int
            kind: bytes
            length, kind = struct.unpack(">I4s", data[at:at + 8])
            at += 12 + length
            if kind == b"IEND":
                return at < len(data)
        return False  # no IEND: truncated, which decoding reports
    if fmt == "JPEG":
        return not data.rstrip(b"\0").endswith(b"\xff\xd9")
    if fmt == "GIF":
        return not data.endswith(b"\x3b")
    riff_size: int = struct.unpack("<I", data[4:8])[0]  # WEBP: RIFF says how long it is
    return 8 + riff_size + (riff_size & 1) < len(data)


def validate_image(data: bytes, config: MediaConfig) -> ProcessedImage:
    """Decode ``data`` and return it cleaned (re-encoded without metadata) with a
    thumbnail; raise :class:`ImageError` for anything that is not an acceptable image.

    The format is what decoding finds, never a name or a declared type. Dimensions
    are checked from the header, before any pixel is decoded.
    """
    if len(data) > config.max_image_bytes:
        raise ImageError("image_too_large", f"the image is {len(data)} bytes; at most "
                         f"{config.max_image_bytes} are accepted", 413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
        fmt = probe.format or ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image_too_big", "the image has too many pixels", 422) from None
    except UnidentifiedImageError:
        raise ImageError("unsupported_image", "not an image in a known format; send PNG, "
                         "JPEG, GIF or WebP", 415) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageError("invalid_image", f"the image cannot be read: {exc}", 400) from None
    if fmt not in FORMATS:
        raise ImageError("unsupported_image", f"{fmt or 'this'} images are not accepted; send "
                         "PNG, JPEG, GIF or WebP", 415)
    width, height = probe.size
    if max(width, height) > config.max_dimension or width * height > config.max_pixels:
        raise ImageError("image_too_big", f"the image is {width}x{height}; at most "
                         f"{config.max_dimension} pixels a side and {config.max_pixels} "
                         "pixels in all are accepted", 422)
    if _trailing_data(data, fmt) or _MARKUP.search(data):
        raise ImageError("polyglot_image", "the file holds more than the image (data after "
                         "its end, or markup); it is refused", 422)
    try:
        probe.verify()
        image: Image.Image = Image.open(io.BytesIO(data))
        image.load()
        if fmt == "JPEG":
            # Before the EXIF goes. In place: a second full-size copy would double the
            # decode's peak for every JPEG, not only for those that need turning.
            ImageOps.exif_transpose(image, in_place=True)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageError("invalid_image", f"the image cannot be decoded: {exc}", 400) from None
    image.info = {k: v for k, v in image.info.items() if k in _KEPT_INFO}
    cleaned = _encode(image, fmt)
    width, height = image.size
    # The full-size image is not needed once encoded: shrink it in place into the
    # thumbnail rather than copying it first.
    image.thumbnail((config.thumbnail_size, config.thumbnail_size))
    thumb_format = _THUMBNAIL_FORMAT[fmt]
    return ProcessedImage(cleaned, FORMATS[fmt], width, height,
                          _encode(image, thumb_format), FORMATS[thumb_format], image.width,
                          image.height)


def _encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    # Animations keep their first frame: save writes only the current one.
    image.save(out, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return out.getvalue()


def parse_data_url(content: str, max_bytes: int) -> bytes | None:
    """The bytes of a base64 ``data:`` URL, or None if ``content`` is not one."""
    match = _DATA_URL.match(content)
    if match is None:
        return None
    encoded = content[match.end():]
    if len(encoded) > (max_bytes + 2) // 3 * 4 + 4:
        raise ImageError("image_too_large", f"the image is over {max_bytes} bytes", 413)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("invalid_image", "the data URL is not valid base64", 400) from None


def media_id_of(content: str) -> str | None:
    """The media id in ``/media/{id}`` or ``http(s)://host/media/{id}``, if that is what
    ``content`` is."""
    match = _MEDIA_PATH.match(content)
    return match.group(1) if match else None


def configure_decoding(config: MediaConfig) -> None:
    """Set how many image decodes may run at once. Per process, not per server: the
    memory they take is the process's."""
    _DECODERS.total_tokens = config.decode_concurrency


def _decode(data: bytes, config: MediaConfig) -> ProcessedImage:
    try:
        return validate_image(data, config)
    finally:
        if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
            _LIBC.malloc_trim(0)


async def save_image(repository: Repository, config: MediaConfig, data: bytes, room_id: int,
                     author_id: int, *, sent: bool = True) -> MediaInfo:
    """Validate ``data`` (in a worker thread, at most ``media.decodeConcurrency`` at once)
    and store it; :class:`ImageError` if refused. An upload (not ``sent``) is deleted
    unless a message names it within ``media.unsentUploadTtl``."""
    image = await trio.to_thread.run_sync(_decode, data, config, limiter=_DECODERS)
    info = MediaInfo(secrets.token_urlsafe(16), room_id, author_id, image.content_type,
                     len(image.data), image.width, image.height, image.thumbnail_type,
                     image.thumbnail_width, image.thumbnail_height, utc_now())
    await repository.save_media(StoredMedia(info, image.data, image.thumbnail, sent))
    return info


async def attach_image(repository: Repository, config: MediaConfig, draft: Draft) -> Draft:
    """A ``chat_img`` draft made to point at its stored image.

    Its content is a data URL (the image is validated and stored now, as the
    draft's author's) or the URL of an image already uploaded to the room.
    Raises :class:`FrameError` naming the draft's client_msg_id otherwise.
    """
    cmid = draft.client_msg_id
    try:
        data = parse_data_url(draft.content, config.max_image_bytes)
        if data is not None:
            assert draft.author_id is not None
            info = await save_image(repository, config, data, draft.room_id, draft.author_id)
        else:
            media_id = media_id_of(draft.content)
            found = None if media_id is None else await repository.media_info(media_id)
            if found is None or found.room_id != draft.room_id:
                raise FrameError("invalid_image", "chat_img content must be a data:image/...;"
                                 "base64 URL or the url of an image uploaded to this room "
                                 "(POST /rooms/{room_id}/images)", cmid)
            info = found
            await repository.media_sent(info.id)
    except ImageError as exc:
        raise FrameError(exc.code, exc.detail, cmid) from None
    return attrs.evolve(draft, content=info.url, image=info.to_wire())


async def expire_unsent_uploads(repository: Repository, config: MediaConfig, *,
                                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                                ) -> None:
    """Delete, every quarter of ``media.unsentUploadTtl`` (at most ten minutes apart),
    the uploads that no message named within it. Never returns.

    Failure boundary: one sweep. A store that fails or hangs (each call has the
    store's deadline), or a bug, is logged with its traceback and the next sweep
    tries again; chat and uploads go on meanwhile, and what was not deleted waits.
    """
    interval = min(config.unsent_upload_ttl / 4, 600.0)
    task_status.started()
    while True:
        await trio.sleep(interval)
        try:
            dropped = await repository.drop_unsent_media(utc_after(-config.unsent_upload_ttl))
        except Exception:
            log.warning("could not delete unsent uploads; trying again in %gs", interval,
                        exc_info=True)
        else:
            if dropped:
                log.info("deleted %d uploads no message named within %gs", dropped,
                         config.unsent_upload_ttl)
