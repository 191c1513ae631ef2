"""The Label Studio REST calls bulk pre-labeling needs, on label-studio-sdk 2.x.

Credentials: the SDK's ``LabelStudio`` client tells the two kinds of ``LABEL_STUDIO_API_KEY``
apart by itself. A JWT with an ``exp`` (a personal access token, i.e. a refresh token) is exchanged
at ``POST /api/token/refresh/`` for a short-lived access token sent as ``Authorization: Bearer``,
refreshed when it expires; anything else is a legacy token sent as ``Authorization: Token`` (LS
>= 1.20 accepts those only where the organization enables legacy tokens). An expired PAT is refused
when the client is built. Tokens never appear in this module's ``repr``, logs or error reasons.

Listing tasks cheaply: :meth:`LabelStudioApi.iter_tasks` uses the Data Manager task list
(``GET /api/tasks``) with

* ``include=id,data,predictions_model_versions`` (the serializer's ``include`` = flex-fields
  parameter): only those three fields come back, never prediction or annotation results;
* ``query={"hiddenColumns": ...}`` hiding every Data Manager column except
  ``predictions_model_versions``: LS computes a DM column only when it is a filter, an ordering or a
  visible column, and hiding the others keeps it from aggregating e.g. ``predictions_results``
  (every prediction's full result, RLE included) per task. The column list comes from
  ``GET /api/dm/columns`` once per project;
* keyset pagination: a filter ``id > last id seen`` with LS's default ordering by id, ``page=1``
  every time, so each page is an indexed range scan, tasks added or deleted meanwhile shift nothing,
  and memory holds one page.

``predictions_model_versions`` is a comma-joined, de-duplicated, 500-character-capped string
(``GroupConcat`` on sqlite, an ``ArrayAgg`` rendered without quotes on PostgreSQL). Where it may be
truncated the task's versions are read exactly from ``GET /api/predictions/?task=ID``; a version
that itself contains a comma is split (see :meth:`TaskRef.has_version` for how the planner copes).

The next tasks in the Data Manager's order (:meth:`LabelStudioApi.next_tasks`, for pre-warming):
the project's first DM tab (``GET /api/dm/views``) gives the filters and the sort key, sent in
``query`` beside the hidden columns. Not ``view=<id>``: with it LS ignores ``query``, so it would
compute every column the tab shows and keep only the rows checked in it.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from backend.errors import ReasonError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
#: LS cuts ``predictions_model_versions`` at 500 characters (``DataManagerTaskSerializer.CHAR_LIMITS``).
_DM_CHAR_LIMIT = 500
_VERSIONS_COLUMN = "predictions_model_versions"
#: how many tasks of a sorted Data Manager tab :meth:`LabelStudioApi.next_tasks` reads at most
#: looking for the current task (10 requests of 100)
MAX_VIEW_SCAN = 1000
_VIEW_PAGE_SIZE = 100


class LabelStudioApiError(ReasonError):
    """A Label Studio call failed. ``reason`` is safe to log and to show (no token, no bodies
    beyond a short excerpt of LS's own error message); ``status`` is the HTTP status, if any."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.status = status


class LabelStudioUnavailable(LabelStudioApiError):
    """LS could not be reached, timed out, or answered 5xx: worth retrying later."""


@dataclass(frozen=True)
class TaskRef:
    """One task as the planner sees it: id, data, and the model versions of its predictions."""

    id: int
    data: dict
    model_versions: frozenset[str] = field(default_factory=frozenset)
    #: the raw DM string could not be read exactly (a version holds a comma, or it was capped)
    versions_ambiguous: bool = False

    def has_version(self, model_version: str) -> bool | None:
        """True/False when known for sure; None when only asking LS per task can tell."""
        if model_version in self.model_versions:
            return True
        if "," in model_version and self.model_versions:
            parts = {p.strip() for p in model_version.split(",")}
            return None if parts <= self.model_versions else False
        return None if self.versions_ambiguous else False


def parse_model_versions(raw: Any) -> tuple[frozenset[str], bool]:
    """DM ``predictions_model_versions`` → (versions, possibly truncated)."""
    if raw is None or raw == "":
        return frozenset(), False
    if isinstance(raw, list):
        return frozenset(str(v).strip() for v in raw if v is not None and str(v).strip()), False
    text = str(raw)
    versions = frozenset(p.strip() for p in text.split(",") if p.strip())
    return versions, len(text) >= _DM_CHAR_LIMIT - 20  # quotes/spaces are rewritten after the cut


class LabelStudioApi:
    """The LS calls of a bulk run. Every call has a timeout (``timeout`` seconds)."""

    def __init__(self, url: str | None, api_key: str | None, timeout: float = DEFAULT_TIMEOUT_S,
                 *, max_retries: int = 2):
        if not url or not api_key:
            raise LabelStudioApiError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: pre-labeling reads tasks "
                                      "from Label Studio and writes predictions back")
        from label_studio_sdk.client import LabelStudio
        from label_studio_sdk.core.api_error import ApiError

        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self._columns: dict[int, list[str]] = {}
        self._last = threading.local()
        try:
            self._client = LabelStudio(base_url=self.url, api_key=api_key, timeout=self.timeout,
                                       max_retries=max_retries,
                                       httpx_client=httpx.Client(timeout=self.timeout, follow_redirects=True,
                                                                 event_hooks={"response": [self._remember]}))
        except ApiError as exc:  # the SDK checks a PAT's expiry up front
            raise LabelStudioApiError(
                f"LABEL_STUDIO_API_KEY was refused before any call ({_api_error_detail(exc)}): create a new "
                "personal access token in Label Studio (Account & Settings)", exc.status_code) from None

    def __repr__(self) -> str:
        return f"LabelStudioApi(url={self.url!r})"

    def close(self) -> None:
        """Close the HTTP connections (also done by ``with LabelStudioApi(...) as api:``)."""
        self._client._client_wrapper.httpx_client.httpx_client.close()

    def __enter__(self) -> "LabelStudioApi":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    __str__ = __repr__

    # ------------------------------------------------------------------------------ reads
    def label_config(self, project: int) -> str:
        project_obj = self._call(f"read project {project}", self._client.projects.get, id=project)
        config = getattr(project_obj, "label_config", None)
        if not isinstance(config, str) or not config.strip():
            raise LabelStudioApiError(f"project {project} has no label config: set one up in Label Studio first")
        return config

    def iter_tasks(self, project: int, page_size: int = 100, after: int | None = None) -> Iterator[TaskRef]:
        """Every task of ``project`` once, by ascending id (the Data Manager's default order),
        ``page_size`` per request (see module doc); ``after``: only tasks whose id is greater."""
        return self._keyset_tasks(project, page_size, after, [], versions=True)

    def next_tasks(self, project: int, after: int | None, count: int) -> list[TaskRef]:
        """Up to ``count`` tasks that follow task ``after`` (None: from the first) in the order of
        the project's first Data Manager tab: its sorting and its filters (not its checked rows),
        as LS's Data Manager lists them; fewer where the tab ends. Without a tab, or where the tab
        does not sort, that is ascending id (LS's default), read by keyset (module doc). A sorted
        tab is paged through from its start: where ``after`` is not among its first
        :data:`MAX_VIEW_SCAN` tasks (filtered out, or too far down) the tasks with greater ids
        follow instead. Raw data as LS sends it to /predict; ``model_versions`` are not read."""
        if count < 1:
            raise ValueError("count must be at least 1")
        filters, ordering, display_types = _view_order(self._first_view(project))
        items = (filters or {}).get("items") or []
        if _orders_by_id(ordering) and ((filters or {}).get("conjunction") == "and" or len(items) <= 1):
            # ascending id: the cheap keyset path, the tab's filters ANDed with the id bound
            return list(itertools.islice(self._keyset_tasks(project, count, after, items, versions=False), count))
        query: dict[str, Any] = {"ordering": ordering, "columnsDisplayType": display_types}
        if items:
            query["filters"] = filters
        found = self._scan_view(project, query, after, count)
        if found is not None:
            return found
        log.info("next tasks of project %d: task %s is not among the first %d tasks of its first Data Manager "
                 "tab; taking the tasks with greater ids", project, after, MAX_VIEW_SCAN)
        return list(itertools.islice(self._keyset_tasks(project, count, after, [], versions=False), count))

    def _keyset_tasks(self, project: int, page_size: int, after: int | None, filters: list[dict],
                      *, versions: bool) -> Iterator[TaskRef]:
        """Tasks by ascending id after ``after`` that pass every filter item of ``filters``."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        last_id = after
        while True:
            items = list(filters)
            if last_id is not None:
                items.append({"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": last_id})
            query = {"filters": {"conjunction": "and", "items": items}} if items else {}
            page, _ = self._task_page(project, query, 1, page_size, versions=versions)
            yield from page
            if len(page) < page_size:
                return
            new_last = page[-1].id
            if last_id is not None and new_last <= last_id:  # defensive: never loop on one page
                raise LabelStudioApiError(f"Label Studio returned tasks out of id order for project {project}")
            last_id = new_last

    def _scan_view(self, project: int, query: dict, after: int | None, count: int) -> list[TaskRef] | None:
        """The ``count`` tasks after ``after`` in the order ``query`` sets, paging from its start;
        None where ``after`` is not among the first :data:`MAX_VIEW_SCAN` tasks."""
        page_size = count if after is None else _VIEW_PAGE_SIZE
        found, out, seen, number = after is None, [], set(), 1
        while True:
            page, total = self._task_page(project, query, number, page_size, versions=False)
            for task in page:
                if task.id in seen:  # ties in the sort key may shift between pages: never twice
                    continue
                seen.add(task.id)
                if found:
                    out.append(task)
                    if len(out) == count:
                        return out
                found = found or task.id == after
            if not page or number * page_size >= total:  # past the last page LS answers 404
                return out if found else None
            if not found and number * page_size >= MAX_VIEW_SCAN:
                return None
            number += 1

    def _task_page(self, project: int, query: dict, page: int, page_size: int, *,
                   versions: bool) -> tuple[list[TaskRef], int]:
        """One page of ``GET /api/tasks`` with ``query`` (filters, ordering) and every other DM
        column hidden (module doc); (tasks in LS's order, how many tasks the query matches)."""
        hidden = self._hidden_columns(project) + ([] if versions else [f"tasks:{_VERSIONS_COLUMN}"])
        query = {**query, "hiddenColumns": {"explore": hidden, "labeling": hidden}}
        pager = self._call(
            f"list tasks of project {project}", self._client.tasks.list, project=project, page=page,
            page_size=page_size, include="id,data" + (f",{_VERSIONS_COLUMN}" if versions else ""),
            fields="task_only",
            # raw data, as LS sends it to /predict: a cloud URI (s3://...) is presigned by the
            # image loader on the LS origin, never resolved to LS's HOSTNAME (maybe another address)
            resolve_uri=False, query=json.dumps(query))
        refs = []
        for item in pager.items or []:
            task_id = int(item.id)
            found, ambiguous = frozenset(), False
            if versions:
                found, ambiguous = parse_model_versions(getattr(item, _VERSIONS_COLUMN, None))
                if ambiguous:  # capped string: read this task's versions exactly
                    found, ambiguous = frozenset(self.prediction_versions(task_id)), False
            refs.append(TaskRef(id=task_id, data=dict(item.data or {}), model_versions=found,
                                versions_ambiguous=ambiguous))
        return refs, int(getattr(pager.response, "total", None) or 0)

    def _first_view(self, project: int):
        """The project's first Data Manager tab (LS lists them by their ``order``, then id), or None."""
        views = self._call(f"list the Data Manager tabs of project {project}", self._client.views.list,
                           project=project)
        return min(views, key=lambda v: (v.order or 0, v.id or 0)) if views else None

    def predictions(self, task_id: int) -> list[tuple[int, str | None]]:
        """(prediction id, model_version) of every prediction of the task."""
        preds = self._call(f"list predictions of task {task_id}", self._client.predictions.list, task=task_id)
        return [(int(p.id), p.model_version) for p in preds]

    def prediction_versions(self, task_id: int) -> list[str]:
        return [version for _, version in self.predictions(task_id) if version is not None]

    # ------------------------------------------------------------------------------ writes
    def create_prediction(self, task_id: int, prediction: dict) -> int:
        """Create one prediction (``result``, ``score``, ``model_version``); returns its id.

        Not retried here (a retry after a lost response would create a second prediction): the
        caller decides, after checking what LS holds.
        """
        created = self._call(
            f"create a prediction for task {task_id}", self._client.predictions.create, task=task_id,
            result=prediction.get("result") or [], score=float(prediction.get("score") or 0.0),
            model_version=prediction.get("model_version"), request_options={"max_retries": 0})
        return int(created.id)

    def delete_prediction(self, prediction_id: int) -> None:
        """Delete a prediction; one that is already gone is fine."""
        from label_studio_sdk.core.api_error import ApiError

        try:
            self._client.predictions.delete(id=prediction_id)
        except ApiError as exc:
            if exc.status_code == 404:
                return
            raise self._error(f"delete prediction {prediction_id}", exc) from None
        except httpx.HTTPError as exc:
            raise self._error(f"delete prediction {prediction_id}", exc) from None

    # ------------------------------------------------------------------------------ plumbing
    def _hidden_columns(self, project: int) -> list[str]:
        if project not in self._columns:
            what = f"read the Data Manager columns of project {project}"
            response = self._call(what, self._client._client_wrapper.httpx_client.request, "api/dm/columns",
                                  method="GET", params={"project": project})
            if response.status_code >= 400:
                raise self._status_error(what, response.status_code, response.text)
            try:
                payload = response.json()
            except ValueError as exc:  # not JSON (UnicodeDecodeError, JSONDecodeError)
                raise self._not_json(what, response.headers.get("content-type"), type(exc).__name__) from None
            if not isinstance(payload, dict):
                raise self._not_json(what, response.headers.get("content-type"), "not a JSON object")
            columns = payload.get("columns") or []
            self._columns[project] = [
                "tasks:" + ("data." if c.get("parent") == "data" else "") + str(c["id"])
                for c in columns if isinstance(c, dict) and c.get("id") and c.get("id") != _VERSIONS_COLUMN]
        return self._columns[project]

    def _call(self, what: str, fn, *args, **kwargs):
        from label_studio_sdk.core.api_error import ApiError

        self._last.content_type = None
        try:
            return fn(*args, **kwargs)
        except ApiError as exc:
            raise self._error(what, exc) from None
        except httpx.HTTPError as exc:
            raise self._error(what, exc) from None
        except ValueError as exc:  # the SDK reading a body that is not JSON (UnicodeDecodeError) or not LS's
            raise self._not_json(what, getattr(self._last, "content_type", None), type(exc).__name__) from None

    def _remember(self, response: httpx.Response) -> None:
        """The httpx response hook: the last answer's Content-Type (this thread's), for :meth:`_not_json`."""
        self._last.content_type = response.headers.get("content-type")

    def _not_json(self, what: str, content_type: str | None, why: str) -> LabelStudioApiError:
        """LS answered 2xx with a body the SDK cannot read (an image, an HTML page, another shape):
        usually LABEL_STUDIO_URL pointing at something that is not Label Studio's API."""
        detail = ", ".join(([_short(content_type, 60)] if content_type else []) + [why])
        log.warning("Label Studio call failed: %s: the answer is not Label Studio's JSON (%s)", what, detail)
        return LabelStudioApiError(f"could not {what}: the answer from {self.url} is not Label Studio's JSON "
                                   f"({detail}): check that LABEL_STUDIO_URL is Label Studio's own address")

    def _error(self, what: str, exc: Exception) -> LabelStudioApiError:
        from label_studio_sdk.core.api_error import ApiError

        if isinstance(exc, ApiError):
            if exc.status_code is not None and 200 <= exc.status_code < 300:  # the SDK's JSONDecodeError
                headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
                return self._not_json(what, headers.get("content-type"), f"HTTP {exc.status_code}")
            return self._status_error(what, exc.status_code, exc.body)
        kind = type(exc).__name__
        log.warning("Label Studio call failed: %s: %s", what, kind)
        return LabelStudioUnavailable(f"could not {what}: Label Studio at {self.url} did not answer ({kind})")

    def _status_error(self, what: str, status: int | None, body: Any) -> LabelStudioApiError:
        detail = _short(body)
        log.warning("Label Studio call failed: %s: HTTP %s", what, status)
        if status in (401, 403):
            hint = ("check LABEL_STUDIO_API_KEY (a legacy token needs legacy tokens enabled in the organization; "
                    "a personal access token must not be revoked) and that the user may access the project")
            return LabelStudioApiError(f"could not {what}: Label Studio answered HTTP {status}: {hint}", status)
        if status is None or status >= 500 or status == 429:
            return LabelStudioUnavailable(f"could not {what}: Label Studio answered HTTP {status}: {detail}", status)
        return LabelStudioApiError(f"could not {what}: Label Studio answered HTTP {status}: {detail}", status)


def _view_order(view) -> tuple[dict | None, list[str], dict]:
    """A DM tab (the SDK's ``View``, or None) → (filters ``{"conjunction", "items"}`` or None,
    ordering: LS sorts by its first key alone, [] = by id; ``columnsDisplayType``, which makes LS
    sort a data field as a number), read from the tab's ``data`` the way LS serializes it."""
    data = getattr(view, "data", None) if view is not None else None
    data = data if isinstance(data, dict) else {}
    filters = data.get("filters")
    ordering = getattr(view, "ordering", None) or data.get("ordering")
    display_types = data.get("columnsDisplayType")
    return (filters if isinstance(filters, dict) and filters.get("items") else None,
            [str(key) for key in ordering] if isinstance(ordering, list) else [],
            display_types if isinstance(display_types, dict) else {})


def _orders_by_id(ordering: list[str]) -> bool:
    """Whether LS lists by ascending id: no sort key, or ``id`` with LS's optional prefixes."""
    if not ordering:
        return True
    key = ordering[0]
    for prefix in ("filter:", "tasks:"):  # in this order, as LS's preprocess_field_name strips them
        key = key[len(prefix):] if key.startswith(prefix) else key
    return key == "id"


def _api_error_detail(exc) -> str:
    return f"HTTP {exc.status_code}: {_short(exc.body)}"


def _short(body: Any, limit: int = 300) -> str:
    if isinstance(body, dict):
        body = body.get("detail") or body.get("validation_errors") or body
    text = body if isinstance(body, str) else json.dumps(body, default=str)
    text = " ".join(text.split())
    return text[:limit] + ("…" if len(text) > limit else "")


__all__ = ["LabelStudioApi", "LabelStudioApiError", "LabelStudioUnavailable", "TaskRef", "parse_model_versions"]
