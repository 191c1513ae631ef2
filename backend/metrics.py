"""Prometheus metrics of one app instance (own registry, so tests can build several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("gsam_http_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=r)
        self.http_seconds = Histogram("gsam_http_request_seconds", "HTTP request latency", ["route"], registry=r)
        self.tasks = Counter("gsam_tasks", "Tasks answered, by outcome (ok, image_error, no_image)",
                             ["outcome"], registry=r)
        self.regions = Counter("gsam_regions", "Regions returned, by type", ["type"], registry=r)
        self.dropped_detections = Counter(
            "gsam_dropped_detections", "Detections that became no region, by reason: no_label (the phrase maps to "
            "no label), threshold (score not above its label's threshold), not_in_outputs, area (mask under the "
            "minimum area), per_label_cap (over the maximum per label)", ["reason"], registry=r)
        self.stage_seconds = Histogram("gsam_stage_seconds", "Time per pipeline stage and call",
                                       ["stage"], registry=r)
        self.embedding_cache_hits = Counter("gsam_embedding_cache_hits",
                                            "Clicks/boxes served from a cached SAM image embedding", registry=r)
        self.embedding_cache_misses = Counter("gsam_embedding_cache_misses",
                                              "SAM image encoder runs for a keyed (interactive) image", registry=r)
        self.prewarmed = Counter("gsam_prewarmed_embeddings",
                                 "Next tasks' image embeddings encoded ahead of the annotator (PREWARM_TASKS)",
                                 registry=r)
        self.embedding_cache_bytes = Gauge("gsam_embedding_cache_bytes", "Bytes held by the embedding cache",
                                           registry=r)
        self.models_loaded = Gauge("gsam_models_loaded", "1 once the models are loaded in this process",
                                   registry=r)
        self.retrieve_deferred_tasks = Counter(
            "gsam_retrieve_deferred_tasks", "Tasks of a batch /predict (Retrieve predictions) not labeled within "
            "RETRIEVE_BUDGET, answered empty and handed to a bulk run", registry=r)
