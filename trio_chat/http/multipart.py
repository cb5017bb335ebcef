"""Reading an uploaded file out of a request: the body itself, or the one file
part of a ``multipart/form-data`` form (parsed by the standard library's email
parser). Sans-IO; runs no task.
"""

from __future__ import annotations

import email.parser
import email.policy

from .base import HttpError, Request, error


def uploaded_file(request: Request) -> bytes:
    """The uploaded file: the body itself, or the one file part of a multipart form."""
    kind = request.headers.get("content-type", "")
    if not kind.lower().startswith("multipart/form-data"):
        return request.body
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {kind}\r\n\r\n".encode("latin-1", "replace") + request.body)
    files = [part for part in message.iter_parts() if part.get_filename() is not None] \
        if message.is_multipart() else []
    if len(files) != 1:
        raise HttpError(error(400, "bad_upload", "a multipart upload must hold exactly one "
                              "file part"))
    payload = files[0].get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""
