"""The next tasks in the Data Manager's order (``LabelStudioApi.next_tasks``, what pre-warming
encodes) against the session's real Label Studio 1.23: the project's first DM tab decides, with its
sorting and its filters; without a tab, or where it does not sort, ascending id.
Run: ``pytest -m e2e tests/test_dm_order.py``."""

from __future__ import annotations

import logging

import pytest

from backend.ls import client as ls_client
from backend.ls.client import LabelStudioApi
from tests.test_e2e_label_studio import LABEL_CONFIG

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(label_studio):
    with LabelStudioApi(label_studio.url, label_studio.legacy_token) as client:
        yield client


def project(ls, title: str, n: int = 5, ranks: list[int] | None = None) -> tuple[int, list[int]]:
    """(project id, task ids in import order = ascending id); task ``i`` has image ``i.png``."""
    pid = ls.create_project(title, LABEL_CONFIG)
    tasks = [{"data": {"image": f"http://example.com/{i}.png", **({"rank": ranks[i]} if ranks else {})}}
             for i in range(n)]
    return pid, ls.import_tasks(pid, tasks)


def ids(refs) -> list[int]:
    return [ref.id for ref in refs]


def id_filter(operator: str, value: int) -> dict:
    return {"filter": "filter:tasks:id", "operator": operator, "type": "Number", "value": value}


@pytest.fixture
def requests_made(api):
    """The paths of the requests ``api`` makes during the test."""
    made: list[str] = []
    hooks = api._client._client_wrapper.httpx_client.httpx_client.event_hooks["request"]
    hook = lambda request: made.append(request.url.path)  # noqa: E731
    hooks.append(hook)
    yield made
    hooks.remove(hook)


def test_without_a_tab_next_is_ascending_id_and_a_descending_tab_reverses_it(ls, api):
    pid, t = project(ls, "dm order: descending")
    assert ids(api.next_tasks(pid, t[0], 2)) == [t[1], t[2]]
    assert ids(api.next_tasks(pid, None, 2)) == [t[0], t[1]]
    ls.create_view(pid, {"ordering": ["-tasks:id"]})
    refs = api.next_tasks(pid, t[3], 2)
    assert ids(refs) == [t[2], t[1]]
    assert refs[0].data == {"image": "http://example.com/2.png"}  # raw data, as LS sends to /predict
    assert refs[0].model_versions == frozenset()
    assert ids(api.next_tasks(pid, None, 2)) == [t[4], t[3]]
    assert ids(api.next_tasks(pid, t[1], 5)) == [t[0]]  # the tab ends there
    with pytest.raises(ValueError, match="count"):
        api.next_tasks(pid, t[0], 0)


def test_the_first_tabs_filter_skips_tasks_and_a_task_outside_it_falls_back_to_id_order(ls, api, caplog):
    pid, t = project(ls, "dm order: filtered")
    ls.create_view(pid, {"ordering": ["-tasks:id"],
                         "filters": {"conjunction": "and", "items": [id_filter("not_equal", t[2])]}})
    ls.create_view(pid, {"ordering": ["tasks:id"]})  # a second tab: not the one that counts
    assert ids(api.next_tasks(pid, t[3], 2)) == [t[1], t[0]]
    with caplog.at_level(logging.INFO, logger="backend.ls.client"):
        assert ids(api.next_tasks(pid, t[2], 2)) == [t[3], t[4]]  # t3 is not in the tab
    assert f"task {t[2]} is not among the first" in caplog.text


def test_an_unsorted_tab_keeps_the_keyset_listing_with_its_filters(ls, api, requests_made):
    pid, t = project(ls, "dm order: unsorted")
    ls.create_view(pid, {"filters": {"conjunction": "and", "items": [id_filter("not_equal", t[1])]}})
    assert ids(api.next_tasks(pid, t[0], 2)) == [t[2], t[3]]
    assert requests_made.count("/api/tasks/") == 1  # one keyset page: no scan from the tab's start

    pid, t = project(ls, "dm order: either")  # "or" does not combine with the id bound: paged
    ls.create_view(pid, {"filters": {"conjunction": "or",
                                     "items": [id_filter("equal", t[1]), id_filter("equal", t[3])]}})
    assert ids(api.next_tasks(pid, None, 3)) == [t[1], t[3]]
    assert ids(api.next_tasks(pid, t[1], 3)) == [t[3]]


def test_a_data_field_sorted_as_a_number(ls, api):
    pid, t = project(ls, "dm order: numeric data", n=4, ranks=[10, 9, 100, 1])
    ls.create_view(pid, {"ordering": ["tasks:data.rank"], "columnsDisplayType": {"tasks:data.rank": "Number"}})
    assert ids(api.next_tasks(pid, None, 4)) == [t[3], t[1], t[0], t[2]]  # 1, 9, 10, 100, not as text


def test_the_scan_for_the_current_task_is_bounded_and_pages(ls, api, requests_made, monkeypatch, caplog):
    pid, t = project(ls, "dm order: bounded")
    ls.create_view(pid, {"ordering": ["-tasks:id"]})
    monkeypatch.setattr(ls_client, "MAX_VIEW_SCAN", 2)
    monkeypatch.setattr(ls_client, "_VIEW_PAGE_SIZE", 2)
    assert ids(api.next_tasks(pid, t[3], 3)) == [t[2], t[1], t[0]]  # across pages 1 to 3
    assert requests_made.count("/api/tasks/") == 3
    requests_made.clear()
    with caplog.at_level(logging.INFO, logger="backend.ls.client"):
        assert ids(api.next_tasks(pid, t[1], 2)) == [t[2], t[3]]  # 4th in the tab: past the bound
    assert requests_made.count("/api/tasks/") == 2  # one page of the tab, then one keyset page
    assert "not among the first 2 tasks" in caplog.text
