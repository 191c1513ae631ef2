"""Images in cloud storage (``s3://``, ``gs://``, ``azure-blob://``), resolved through Label Studio.

Label Studio's cloud import storages (S3, GCS, Azure Blob) with "treat every bucket object as a
source file" (``use_blob_urls``) write task data such as ``s3://bucket/dir/key.jpg``. The backend
holds no storage credentials (they live in LS), so it asks Label Studio, as label-studio-sdk's
``get_local_path`` does::

    GET {LABEL_STUDIO_URL}/tasks/{task_id}/presign/?fileuri={urlsafe base64 of the URI}

with the LS credentials. LS answers a ``303`` to a pre-signed storage URL when the storage has
"pre-signed URLs" on, or streams the bytes itself (``200``) when it is off (proxy mode).
:func:`presign_url` builds that request; :mod:`backend.images.download` follows the answer.

:func:`is_resolve_request` tells the downloader which LS requests are presign/resolve requests
(``/tasks/<id>/presign/``, ``/tasks/<id>/resolve/`` and the ``/projects/<id>/...`` forms, the
latter two what LS's own task listings hold with ``resolve_uri``): their redirect names the storage
endpoint the LS admin configured, so that one hop may go to a private host (MinIO next to LS).

May import: :mod:`backend.errors` (``ImageError``) and :mod:`backend.images.sources`
(``describe``).
"""

from __future__ import annotations

import base64
import re

from backend.errors import ImageError
from backend.images.sources import describe

__all__ = ["CLOUD_SCHEMES", "MAX_CLOUD_URI_CHARS", "cloud_scheme", "is_resolve_request", "presign_url"]

#: The URI schemes LS's cloud import storages write (``url_scheme`` of its S3, GCS and Azure storages).
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
#: A bucket key is at most 1024 bytes on S3 and GCS; with the scheme and bucket this bounds it.
MAX_CLOUD_URI_CHARS = 2048
# LS task ids are Django AutoField/BigAutoField primary keys.
_MAX_TASK_ID = 2**63 - 1
_RESOLVE_PATH = re.compile(r"/(?:tasks|projects)/[0-9]{1,19}/(?:presign|resolve)/?")


def cloud_scheme(url: str) -> str | None:
    """The cloud storage scheme ``url`` starts with (``s3``, ``gs``, ``azure-blob``), else ``None``.

    Case-sensitive and with ``://``, as LS matches a URI to its storage.
    """
    for scheme in CLOUD_SCHEMES:
        if url.startswith(scheme + "://"):
            return scheme
    return None


def presign_url(ls_base: str | None, task_id: object, uri: str) -> str:
    """The LS URL that resolves the cloud ``uri`` of task ``task_id``; an :class:`ImageError`
    that says what to fix when there is no LS to ask, no usable task id, or an unusable URI."""
    shown = describe(uri)
    if ls_base is None:
        raise ImageError(
            f"the image {shown} is in cloud storage, which the backend reads through Label Studio: "
            "set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) to the Label Studio that holds the "
            "project's cloud storage"
        )
    if len(uri) > MAX_CLOUD_URI_CHARS:
        raise ImageError(
            f"the cloud storage URI {shown} is {len(uri)} characters, over the limit of "
            f"{MAX_CLOUD_URI_CHARS}"
        )
    if any(not c.isprintable() for c in uri):
        raise ImageError(
            f"refusing the cloud storage URI {shown}: it contains control or invisible characters"
        )
    scheme = cloud_scheme(uri)
    if scheme is None or not uri[len(scheme) + 3 :].partition("/")[0]:
        raise ImageError(
            f"the cloud storage URI {shown} names no bucket: expected "
            f"{scheme or 's3'}://<bucket>/<key>"
        )
    if (
        isinstance(task_id, bool)
        or not isinstance(task_id, int)
        or not 0 < task_id <= _MAX_TASK_ID
    ):
        raise ImageError(
            f"the image {shown} is in cloud storage and Label Studio resolves it per task, but the "
            f"task has no usable id ({type(task_id).__name__}): send the task's Label Studio id"
        )
    fileuri = base64.urlsafe_b64encode(uri.encode("utf-8")).decode("ascii")
    return f"{ls_base}/tasks/{task_id}/presign/?fileuri={fileuri}"


def is_resolve_request(request_uri: str, ls_path: str) -> bool:
    """Whether ``request_uri`` (path and query of a request to the LS origin) asks LS to resolve
    a storage URI: ``<ls_path>/tasks/<id>/presign/`` or ``.../resolve/``, or the ``/projects/<id>/``
    forms. ``ls_path`` is ``LABEL_STUDIO_URL``'s path without its trailing ``/``."""
    path = request_uri.split("?", 1)[0]
    if not path.startswith(ls_path):
        return False
    return _RESOLVE_PATH.fullmatch(path[len(ls_path) :]) is not None
