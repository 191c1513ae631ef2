"""The Label Studio protocol: everything that knows LS's shapes, and nothing else.

- ``labelconfig``: the project's XML label config → the controls the backend writes to, their
  labels, ``predicted_values`` aliases, phrase → label mapping;
- ``tasks``: a ``/predict`` body → ``PredictRequest`` → one ``TaskPlan`` per task (image URL,
  phrases), with the request bounds;
- ``smartprompt``: the smart-tool context (keypoints, rectangles, in LS percent) → clicks and boxes;
- ``geometry``: LS percent ↔ pixels, the only coordinate conversion (rectangles rotate in pixels,
  about their top-left corner); ``regions``: engine results (pixels) → LS prediction JSON (brush
  RLE, bitmask PNG, rectangles, polygons);
  ``polygons``: a mask → its outer contours as simplified polygons (OpenCV), for ``PolygonLabels``;
- ``videotime``: LS's video clock (frame *f* ↔ seconds, ``framesCount``); ``videocontext``: the
  tracks an interactive video call sends; ``videoregions``: tracks (pixels) → ``videorectangle``
  results, keyframes thinned to what LS's interpolation reproduces;
- ``client``: the LS API (tasks, predictions, label config) through label-studio-sdk; ``auth``: LS
  credentials (legacy token, or a personal access token refreshed into a Bearer access token).

May import: the foundation modules directly in ``backend/`` (``errors``, ``rle``, ``bitmask``, ``results`` — the
engine's torch-free result types, which ``regions`` reads) and this package; never the images,
engine, pipeline, queue, bulk, modes or web packages, so it stays free of torch and of the
transports. Imported by every layer above it.
"""
