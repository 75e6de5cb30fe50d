"""Unit tests of the relist machinery (crigw's ListCache, shimd's InitWatch) and of common.heap.

The end-to-end listing is covered by test_sandboxes.py / test_containers.py
and, through restarts and kills, by the fault tests.
"""

from __future__ import annotations

import subprocess
import time

from cri_api.v1 import api_pb2

from services.crigw.list_cache import ListCache
from services.shimd.liveness import InitWatch


def _encode(record: dict, state: int) -> bytes:
    return api_pb2.Container(id=record["id"], labels=record.get("labels", {}), state=state).SerializeToString()


def test_list_cache_builds_the_response_and_fetches_only_unseen_ids() -> None:
    fetched: list[list[str]] = []

    def fetch(ids: list[str]) -> list[dict]:
        fetched.append(list(ids))
        return [{"id": item_id, "labels": {"n": item_id}} for item_id in ids if item_id != "gone"]

    cache = ListCache(_encode)
    data = cache.response_bytes([["a", 1], ["b", 2]], fetch, complete=True)
    response = api_pb2.ListContainersResponse.FromString(data)
    assert [(c.id, c.state, c.labels["n"]) for c in response.containers] == [("a", 1, "a"), ("b", 2, "b")]
    assert fetched == [["a", "b"]]
    # Seen ids in the same state come from the cache; no fetch.
    cache.response_bytes([["a", 1], ["b", 2]], fetch, complete=True)
    assert fetched == [["a", "b"]]
    # A state change fetches that id alone again (only the bytes are kept, not the record).
    response = api_pb2.ListContainersResponse.FromString(cache.response_bytes([["a", 2], ["b", 2]], fetch, complete=True))
    assert [(c.id, c.state, c.labels["n"]) for c in response.containers] == [("a", 2, "a"), ("b", 2, "b")]
    assert fetched == [["a", "b"], ["a"]]
    # An id removed between the brief list and the fetch is left out.
    response = api_pb2.ListContainersResponse.FromString(cache.response_bytes([["gone", 1], ["b", 2]], fetch, complete=True))
    assert [c.id for c in response.containers] == ["b"]
    # An unfiltered list forgot "a": it is fetched again when it reappears.
    cache.response_bytes([["a", 1]], fetch, complete=False)
    assert fetched[-1] == ["a"]
    assert cache.response_bytes([], fetch, complete=True) == b""


def test_init_watch_sees_an_exit_through_the_pidfd() -> None:
    child = subprocess.Popen(["sleep", "30"])
    watch = InitWatch()
    try:
        watch.watch("c1", [child.pid], lambda: True)
        assert watch.alive("c1") and watch.alive_ids() == {"c1"}
        child.kill()
        child.wait()
        assert watch.alive_ids() == set()
        assert not watch.alive("c1")
    finally:
        child.kill()
        child.wait()


def test_init_watch_refuses_a_pid_that_changed_and_keeps_exits() -> None:
    child = subprocess.Popen(["sleep", "30"])
    watch = InitWatch()
    try:
        watch.watch("c1", [child.pid], lambda: False)  # the pid was reused meanwhile
        assert not watch.alive("c1")
        watch.remember_exit("c1", {"exit_code": 3})
        assert watch.exit_record("c1") == {"exit_code": 3}
        watch.forget("c1")
        assert watch.exit_record("c1") is None
    finally:
        child.kill()
        child.wait()


def test_idle_trim_runs_once_after_activity_and_quiet() -> None:
    from common.heap import IdleTrim

    trim = IdleTrim(idle_seconds=0.05)
    assert not trim.maybe_trim()  # nothing happened yet
    trim.note_activity()
    assert not trim.maybe_trim()  # not quiet long enough
    time.sleep(0.06)
    assert not trim.maybe_trim(busy=True)  # a call is in flight
    assert trim.maybe_trim()
    assert not trim.maybe_trim()  # once per burst
