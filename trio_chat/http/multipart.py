"""Reading an uploaded file out of a request: the body itself, or the one file
part of a ``multipart/form-data`` form (RFC 7578).

The form is read by :func:`file_part`, sans-IO, which walks the body with
``bytes.find`` (C speed) and gives up after :data:`MAX_PARTS` parts or a part
head over :data:`MAX_PART_HEAD_BYTES`: a body of 150,000 empty parts costs the
same as one of sixteen, a few milliseconds at most for the largest body. The
caps are what bound it (searching and copying hold the GIL);
:func:`uploaded_file` still runs it in a worker thread, so the event loop takes
its other turns in between; the copy of the file counts in the address's body
budget. Runs no task.
"""

from __future__ import annotations

import re

import trio

from .base import HttpError, Request, error

# A form with one file and a few fields is all an upload needs; more is an attack on
# the parser, refused before it costs anything.
MAX_PARTS = 16
# The head of one part: Content-Disposition and Content-Type, with room to spare.
MAX_PART_HEAD_BYTES = 4096

_BOUNDARY = re.compile(r';\s*boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.IGNORECASE)
_FILENAME = re.compile(rb"^content-disposition:[^\r\n]*;\s*filename\*?=", re.IGNORECASE
                       | re.MULTILINE)


def _bad(detail: str, status: int = 400, code: str = "bad_upload") -> HttpError:
    return HttpError(error(status, code, detail))


def file_part(body: bytes, content_type: str) -> bytes:
    """The one file part of a ``multipart/form-data`` ``body``; :class:`HttpError` (400,
    or 413 ``too_many_parts``) if the form is malformed, holds no file or several, or
    has more parts than :data:`MAX_PARTS`."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise _bad("a multipart upload needs a boundary parameter")
    delimiter = b"--" + (found.group(1) or found.group(2)).encode("latin-1")
    # The preamble before the first delimiter is ignored (RFC 2046 5.1.1).
    at = 0 if body.startswith(delimiter) else body.find(b"\r\n" + delimiter)
    if at < 0:
        raise _bad("the multipart body has no part")
    at += len(delimiter) if at == 0 else 2 + len(delimiter)
    closing = b"\r\n" + delimiter
    files: list[bytes] = []
    parts = 0
    while True:
        if body.startswith(b"--", at):
            break  # the close delimiter
        if not body.startswith(b"\r\n", at):
            raise _bad("a multipart delimiter must end its line")
        parts += 1
        if parts > MAX_PARTS:
            raise _bad(f"a multipart upload may hold at most {MAX_PARTS} parts", 413,
                       "too_many_parts")
        head_end = body.find(b"\r\n\r\n", at, at + 2 + MAX_PART_HEAD_BYTES + 4)
        if head_end < 0:
            raise _bad(f"a part's headers must end within {MAX_PART_HEAD_BYTES} bytes")
        end = body.find(closing, head_end + 4)
        if end < 0:
            raise _bad("the multipart body is not closed")
        if _FILENAME.search(body, at + 2, head_end + 2):
            files.append(body[head_end + 4:end])
        at = end + len(closing)
    if len(files) != 1:
        raise _bad("a multipart upload must hold exactly one file part")
    return files[0]


async def uploaded_file(request: Request) -> bytes:
    """The uploaded file: the body itself, or the one file part of a multipart form
    (read in a worker thread). Its copy counts at the body's size in the address's
    body budget until the handler returns; 429 or 503 when that has no room."""
    kind = request.headers.get("content-type", "")
    if not kind.lower().startswith("multipart/form-data"):
        return request.body
    refused = request.hold(len(request.body))
    if refused is not None:
        raise HttpError(refused)
    return await trio.to_thread.run_sync(file_part, request.body, kind)
