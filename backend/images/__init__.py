"""Task image URL → RGB image in the EXIF-transposed frame (the frame every model output refers to).

Owns the URL policy (which task URLs are accepted and where their bytes come from, cloud storage
URIs through Label Studio's presign endpoint included), the SSRF guard,
the pinned fetch (one checked address per hop, redirects, deadlines, size limits, LS credentials
only to the LS origin), and decoding with its format, pixel and memory (pixel budget) limits.

Modules, lowest first:

* ``decode``    ``ImageError``, ``PixelBudget``, ``decode_image`` (bytes → RGB, EXIF-transposed),
                ``LoadedImage`` (+ ``LoadedImage.from_bytes``).
* ``urlguard``  which addresses a host has, and whether they are public (SSRF guard).
* ``safefetch`` URL parsing into one ``Target``; ``PinnedHTTP``, a GET to an already checked address.
* ``sources``   task URL resolution: LS-relative paths, local files, data: URIs; log-safe URLs.
* ``cloud``     ``s3://``, ``gs://``, ``azure-blob://`` URIs: the LS presign request that resolves
                them, and which LS requests are presign requests (their redirect may reach a
                private storage host).
* ``config``    ``FetchSettings``: every limit, validated once.
* ``download``  ``Downloader``: the pinned download of one http(s) URL and its redirect chain.
* ``fetch``     ``ImageLoader``: ties them together (the package's entry point); ``fetch`` gives
                a task's media bytes undecoded (videos) under the same policy.
* ``video``     ``VideoSource``: a video's bytes → streaming RGB frames numbered as LS numbers them
                (PyAV; frames mapped through time), ``VideoError`` for what cannot be decoded.

May import: the foundation modules (``backend.errors``, ``backend.settings``, ...) and
``backend.ls.auth`` for the LS token; nothing above (no pipeline, engine, queue, bulk, web).
This ``__init__`` imports nothing, so importing one module does not load the others.
"""
