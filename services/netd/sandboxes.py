"""Sandbox records: the state machine, name reservation, id lookup, filters.

One JSON file per sandbox in `<state_dir>/netd/sandboxes/`, written
atomically; the in-memory index is rebuilt from them at start.

States:
  creating  written before RunPodSandbox touches the node; never listed.
            A record still `creating` when netd starts is the trace of an
            interrupted run and is torn down then.
  ready     namespaces pinned and the network attached.
  notready  stopped (or a failed run whose clean-up failed): the kubelet
            removes it.
The record exists, and reserves its metadata name, until RemovePodSandbox.

Relisting (the kubelet asks every second) reads `brief()`: (id, state) pairs
from an in-memory index kept in step with every write, with no copy of any
record. A listed sandbox's other listed fields (metadata, labels, annotations,
created_at, runtime_handler) never change, so a caller may cache them by id.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any, Iterator

from common.errors import AlreadyExists, NotFound
from common.ids import resolve_id
from common.state import atomic_write_json, iter_json_records, remove_file, remove_stale_temp_files

CREATING = "creating"
READY = "ready"
NOTREADY = "notready"


def name_key(metadata: dict[str, Any]) -> str:
    """The unique pod name, as CRI-O's k8s_<name>_<namespace>_<uid>_<attempt>."""
    return "k8s_{}_{}_{}_{}".format(
        metadata.get("name", ""), metadata.get("namespace", ""), metadata.get("uid", ""), metadata.get("attempt", 0)
    )


def matches_filter(record: dict[str, Any], filter_: dict[str, Any]) -> bool:
    """The ListPodSandbox filter: id prefix, state, label selector (all must hold);
    `ids` (a list of full ids) is netd's own, for fetching records a caller lacks."""
    if filter_.get("id") and not record["id"].startswith(filter_["id"]):
        return False
    if filter_.get("ids") is not None and record["id"] not in filter_["ids"]:
        return False
    if filter_.get("state") and record["state"] != filter_["state"]:
        return False
    labels = record.get("labels") or {}
    for key, value in (filter_.get("label_selector") or {}).items():
        if labels.get(key) != value:
            return False
    return True


class SandboxStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_temp_files(directory)
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self._by_name: dict[str, str] = {}
        self._operation_locks: dict[str, threading.Lock] = {}
        for sandbox_id, record in iter_json_records(directory):
            if isinstance(record, dict) and record.get("id") == sandbox_id:
                self._records[sandbox_id] = record
                self._by_name[name_key(record.get("metadata", {}))] = sandbox_id

    def _path(self, sandbox_id: str) -> Path:
        return self.directory / f"{sandbox_id}.json"

    def reserve(self, record: dict[str, Any]) -> None:
        """Write a new record, refusing a name that an existing sandbox holds."""
        key = name_key(record["metadata"])
        with self._lock:
            holder = self._by_name.get(key)
            if holder is not None:
                raise AlreadyExists(
                    f"pod sandbox with name {key!r} already exists: it is sandbox {holder} "
                    f"({self._records[holder]['state']}); remove it first"
                )
            atomic_write_json(self._path(record["id"]), record)
            self._records[record["id"]] = copy.deepcopy(record)
            self._by_name[key] = record["id"]

    def save(self, record: dict[str, Any]) -> None:
        with self._lock:
            atomic_write_json(self._path(record["id"]), record)
            self._records[record["id"]] = copy.deepcopy(record)

    def delete(self, sandbox_id: str) -> None:
        with self._lock:
            remove_file(self._path(sandbox_id))
            record = self._records.pop(sandbox_id, None)
            if record is not None:
                key = name_key(record["metadata"])
                if self._by_name.get(key) == sandbox_id:
                    del self._by_name[key]
            self._operation_locks.pop(sandbox_id, None)

    def resolve(self, given: str, include_creating: bool = False) -> str:
        """The full id of a sandbox from its id or unique prefix, or NotFound."""
        with self._lock:
            known = [
                sandbox_id
                for sandbox_id, record in self._records.items()
                if include_creating or record["state"] != CREATING
            ]
        return resolve_id(given, known, "pod sandbox")

    def get(self, sandbox_id: str) -> dict[str, Any]:
        with self._lock:
            record = self._records.get(sandbox_id)
            if record is None:
                raise NotFound(f"pod sandbox {sandbox_id!r} not found")
            return copy.deepcopy(record)

    def all(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            records = [copy.deepcopy(record) for record in self._records.values()]
        yield from sorted(records, key=lambda record: record["created_at"])

    def listed(self) -> list[dict[str, Any]]:
        """The records as they are held (never to be modified by the caller), oldest
        first, without those still being created: for cheap filtering."""
        with self._lock:
            records = [record for record in self._records.values() if record["state"] != CREATING]
        records.sort(key=lambda record: record["created_at"])
        return records

    def operation_lock(self, sandbox_id: str) -> threading.Lock:
        """Serializes run/stop/remove of one sandbox."""
        with self._lock:
            return self._operation_locks.setdefault(sandbox_id, threading.Lock())
