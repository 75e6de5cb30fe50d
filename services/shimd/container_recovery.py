"""shimd's side of its own restarts: containers a killed shimd left half-made,
half-removed, or started but recorded as created.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from common.errors import PyrioError
from services.shimd.records import PHASE_CREATED, PHASE_CREATING, PHASE_REMOVING

log = logging.getLogger("pyrio.shimd")


class ContainerRecovery:
    """Finishes at start what a killed shimd left undone (part of ShimDaemon)."""

    def _exited_ids(self) -> list[str]:
        return [record["id"] for record in self.store.all()
                if record.get("phase") == PHASE_CREATED and self.store.exit_file(record["id"]).exists()]

    def _finish_interrupted(self) -> None:
        """Records left half-made or half-removed by a shimd that was killed."""
        for record in self.store.all():
            if record.get("phase") == PHASE_CREATED and not record.get("started_at"):
                try:
                    self._adopt_start(record)
                except PyrioError as exc:
                    log.warning("cannot ask the runtime about a created container", extra={"container_id": record["id"], "error": str(exc)})
            if record.get("phase") in (PHASE_CREATING, PHASE_REMOVING):
                self._destroy_with_retries(record)

    def _destroy_with_retries(self, record: dict[str, Any]) -> None:
        """Finish removing a container whose removal failed or was interrupted
        (imaged down, say). Its record is no longer listed, so nobody else
        would ever retry: keep at it here."""
        for attempt in range(60):
            try:
                with self.store.lock_for(record["id"]):
                    if self.store.find(record["id"]) is None:
                        return
                    self._destroy(record)
                log.info("finished an interrupted create/remove", extra={"container_id": record["id"]})
                return
            except PyrioError as exc:
                log.info("retrying interrupted clean-up", extra={"container_id": record["id"], "error": str(exc)})
                time.sleep(min(5.0, 0.5 * (attempt + 1)))
        log.error("giving up cleaning up a container until shimd restarts", extra={"container_id": record["id"]})

    def _destroy_later(self, record: dict[str, Any]) -> None:
        threading.Thread(target=self._destroy_with_retries, args=(record,), name="shimd-cleanup", daemon=True).start()

    def _adopt_start(self, record: dict[str, Any]) -> None:
        """A shimd killed between `runtime start` and saving the record left a
        running container recorded as created: the runtime knows better."""
        with self.store.lock_for(record["id"]):
            if record.get("started_at") or not self.store.init_alive(record):
                return
            if self._runtime_status(record) == "running":
                record["started_at"] = time.time_ns()
                self.store.save(record)
                log.info("found a started container recorded as created", extra={"container_id": record["id"]})
