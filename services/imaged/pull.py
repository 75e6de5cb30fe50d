"""Pulling an image: resolve the manifest (through mirrors), pick this
node's platform, fetch and verify the config, then download and unpack the
missing layers concurrently, and only then write the image record.

Two pulls of the same reference (with the same credentials) share one run;
two pulls of different images that share a layer fetch it once (a per-layer
lock). Layer blobs are streamed to a temp file, verified, unpacked into a
temp dir whose diff id is verified, then renamed into place.

What a pull may cost is bounded: descriptors must declare sizes within
image.max_layer_size, layers expand to no more than it, the store keeps
image.free_space_reserve free (space.py); downloads share slots fairly
between registries, fail below image.min_download_rate (transfer.py), and
stop once no caller of their run waits any more (its deadline passed, or
crigw reported its call cancelled: `abandon`).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import re
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable

from common.config import ImageSection
from common.errors import DeadlineExceeded, FailedPrecondition, PyrioError, ResourceExhausted
from services.imaged import manifest as manifests
from services.imaged.reference import Reference, parse_reference
from services.imaged.registry import Credentials, RegistryClient, endpoints_for
from services.imaged.space import DiskReserve, GuardedWriter
from services.imaged.store import Store
from services.imaged.transfer import Cancelled, DownloadSlots, per_registry_cap
from services.imaged.unpack import UnpackLimits, unpack_layer

log = logging.getLogger("pyrio.imaged.pull")

MAX_CONFIG_BYTES = 8 << 20
_DIFF_ID = re.compile(r"^sha256:[a-f0-9]{64}$")


@dataclass
class Resolved:
    """What the manifest side of a pull found."""

    client: RegistryClient
    top_digest: str
    manifest_digest: str
    manifest: dict[str, Any]
    manifest_blobs: dict[str, bytes] = field(default_factory=dict)
    config_digest: str = ""
    config_bytes: bytes = b""
    config: dict[str, Any] = field(default_factory=dict)


class PullRun:
    """One pull in progress and the deadlines of the callers waiting for it:
    once every one has passed, nobody can use the result and the pull's
    downloads stop."""

    def __init__(self) -> None:
        self.result: Future = Future()
        self._deadlines: dict[int, float] = {}
        self._lock = threading.Lock()
        self._next_token = 0

    def join(self, deadline: float) -> int:
        with self._lock:
            self._next_token += 1
            self._deadlines[self._next_token] = deadline
            return self._next_token

    def leave(self, token: int) -> None:
        with self._lock:
            self._deadlines.pop(token, None)

    def abandoned(self) -> str:
        """Why the pull is no longer wanted, or "" while a caller waits."""
        with self._lock:
            if any(deadline > time.time() for deadline in self._deadlines.values()):
                return ""
        return "no caller waits for this pull any more (each one's deadline passed or it cancelled its call)"


class Puller:
    def __init__(self, store: Store, settings: ImageSection) -> None:
        self.store = store
        self.settings = settings
        self.reserve = DiskReserve(str(store.root), settings.free_space_reserve)
        self._download_slots = DownloadSlots(
            settings.max_concurrent_downloads,
            per_registry_cap(settings.max_concurrent_downloads, settings.max_downloads_per_registry),
        )
        # Layer jobs wait on their layer lock and the download slots, so the
        # pool is larger than the download bound.
        self._jobs = ThreadPoolExecutor(max_workers=max(8, settings.max_concurrent_downloads * 4), thread_name_prefix="layer")
        self._in_flight: dict[str, PullRun] = {}
        self._in_flight_lock = threading.Lock()
        # waiter id (from crigw) -> the run it waits for and its token there.
        self._waiters: dict[str, tuple[PullRun, int]] = {}

    def close(self) -> None:
        self._jobs.shutdown(wait=False, cancel_futures=True)

    def pull(self, image: str, auth: dict[str, Any] | None, deadline: float | None = None, waiter: str = "") -> dict[str, Any]:
        """Pull `image` for a caller that waits until `deadline` (time.time())
        or until `abandon(waiter)`; returns the image record."""
        reference = parse_reference(image)
        credentials = Credentials.from_cri(auth)
        key = f"{reference}|{credentials.fingerprint()}"
        deadline = deadline if deadline is not None else time.time() + 365 * 86400.0
        with self._in_flight_lock:
            run = self._in_flight.get(key)
            joining = run is not None
            if run is None:
                run = self._in_flight[key] = PullRun()
            token = run.join(deadline)
            if waiter:
                self._waiters[waiter] = (run, token)
        try:
            if joining:
                log.info("joining a pull in progress", extra={"image": str(reference)})
                try:
                    return run.result.result(timeout=max(0.0, deadline - time.time()))
                except FutureTimeout:
                    raise DeadlineExceeded(
                        f"image {reference}: the caller's deadline passed while it waited for the pull in progress"
                    ) from None
            try:
                record = self._pull(reference, credentials, run)
                run.result.set_result(record)
                return record
            except BaseException as exc:
                run.result.set_exception(exc)
                if isinstance(exc, PyrioError):
                    # The caller may be gone (its deadline passed): say it here too.
                    log.warning("pull failed", extra={"image": str(reference), "error": exc.message})
                raise
            finally:
                with self._in_flight_lock:
                    self._in_flight.pop(key, None)
        finally:
            run.leave(token)
            with self._in_flight_lock:
                self._waiters.pop(waiter, None)

    def abandon(self, waiter: str) -> bool:
        """The caller `waiter` stopped waiting; its pull's downloads stop if
        it was the last. False when no pull waits for it (already answered)."""
        with self._in_flight_lock:
            found = self._waiters.pop(waiter, None)
        if found is None:
            return False
        run, token = found
        run.leave(token)
        log.info("a caller left its pull", extra={"waiter": waiter})
        return True

    # --- manifest side --------------------------------------------------------

    def _pull(self, reference: Reference, credentials: Credentials, run: PullRun) -> dict[str, Any]:
        started = time.monotonic()
        resolved = self._resolve_through_endpoints(reference, credentials)
        record = self._fetch_layers_and_commit(reference, resolved, run)
        log.info(
            "pulled",
            extra={"image": str(reference), "image_id": record["id"], "endpoint": resolved.client.endpoint.host,
                   "seconds": round(time.monotonic() - started, 3)},
        )
        return record

    def _resolve_through_endpoints(self, reference: Reference, credentials: Credentials) -> Resolved:
        for endpoint in endpoints_for(reference, self.settings.registries):
            client = RegistryClient(
                endpoint, reference.path, credentials, self.settings.pull_progress_timeout,
                self.settings.min_download_rate, self.settings.download_rate_window,
            )
            try:
                return self._resolve(client, reference)
            except PyrioError as exc:
                if not endpoint.mirror:
                    raise
                log.warning("mirror failed, trying the next endpoint", extra={"image": str(reference), "mirror": endpoint.host, "error": str(exc)})
        raise AssertionError("the upstream endpoint always comes last")

    def _resolve(self, client: RegistryClient, reference: Reference) -> Resolved:
        what = f"image {reference}"
        body, media_type, header_digest = client.get_manifest(reference.endpoint_reference, manifests.ACCEPT)
        top_digest = manifests.verify_manifest_digest(body, reference.digest or header_digest, what)
        kind, document = manifests.parse_manifest(body, media_type, what)
        resolved = Resolved(client=client, top_digest=top_digest, manifest_digest=top_digest, manifest=document)
        resolved.manifest_blobs[top_digest] = body
        if kind in manifests.INDEXES:
            entry = manifests.select_platform(document, manifests.node_platform(), what)
            body, media_type, _ = client.get_manifest(entry["digest"], manifests.ACCEPT)
            resolved.manifest_digest = manifests.verify_manifest_digest(body, entry["digest"], what)
            kind, document = manifests.parse_manifest(body, media_type, what)
            if kind in manifests.INDEXES:
                raise FailedPrecondition(f"{what}: an index inside an index is not supported")
            resolved.manifest = document
            resolved.manifest_blobs[resolved.manifest_digest] = body
        config_descriptor = document.get("config") or {}
        config_digest = str(config_descriptor.get("digest", ""))
        if not _DIFF_ID.match(config_digest):
            raise FailedPrecondition(f"{what}: the manifest's config digest {config_digest!r} is not a sha256 digest")
        size = manifests.declared_size(config_descriptor, MAX_CONFIG_BYTES, "for an image config", what)
        buffer = io.BytesIO()
        client.download_blob(config_digest, buffer, size)
        resolved.config_digest, resolved.config_bytes = config_digest, buffer.getvalue()
        try:
            resolved.config = json.loads(resolved.config_bytes)
            diff_ids = resolved.config["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError):
            raise FailedPrecondition(f"{what}: the image config is not valid (no rootfs.diff_ids)") from None
        layers = manifests.layer_descriptors(document, what)
        for layer in layers:
            manifests.declared_size(layer, self.settings.max_layer_size, "image.max_layer_size", what)
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise FailedPrecondition(
                f"{what}: the config lists {len(diff_ids) if isinstance(diff_ids, list) else 0} diff ids "
                f"for {len(layers)} layers"
            )
        for diff_id in diff_ids:
            # Diff ids name directories in the store: nothing but a digest may pass.
            if not isinstance(diff_id, str) or not _DIFF_ID.match(diff_id):
                raise FailedPrecondition(f"{what}: invalid diff id {diff_id!r} in the image config")
        return resolved

    # --- layers -----------------------------------------------------------------

    def _fetch_layers_and_commit(self, reference: Reference, resolved: Resolved, run: PullRun) -> dict[str, Any]:
        descriptors = resolved.manifest["layers"]
        diff_ids: list[str] = resolved.config["rootfs"]["diff_ids"]
        self.store.pin_layers(diff_ids)
        try:
            missing = [(descriptor, diff_id) for descriptor, diff_id in zip(descriptors, diff_ids) if not self.store.has_layer(diff_id)]
            # A layer listed twice is fetched once.
            unique = list({diff_id: (descriptor, diff_id) for descriptor, diff_id in missing}.values())
            if unique:
                # The blobs at least must fit above the reserve; what they
                # expand to is watched while they unpack.
                self.reserve.require(sum(int(descriptor["size"]) for descriptor, _ in unique), f"image {reference}")
                self._run_layer_jobs(resolved.client, unique, run)
            return self._commit_image(reference, resolved, diff_ids)
        finally:
            self.store.unpin_layers(diff_ids)

    def _run_layer_jobs(self, client: RegistryClient, jobs: list[tuple[dict[str, Any], str]], run: PullRun) -> None:
        cancel = threading.Event()

        def unwanted() -> str:
            if cancel.is_set():
                return "another layer of the same pull failed"
            return run.abandoned()

        futures = [self._jobs.submit(self._fetch_layer, client, descriptor, diff_id, unwanted) for descriptor, diff_id in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(future.exception() for future in done):
            cancel.set()
            wait(futures)
            errors = [future.exception() for future in futures if future.exception() is not None]
            first = next(future.exception() for future in done if future.exception() is not None)
            # Report the failure that caused the others to be cancelled.
            raise next((error for error in errors if not isinstance(error, Cancelled)), first)

    def _fetch_layer(self, client: RegistryClient, descriptor: dict[str, Any], diff_id: str, unwanted: Callable[[], str]) -> None:
        try:
            self._fetch_layer_once(client, descriptor, diff_id, unwanted)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    f"layer {descriptor.get('digest')}: no space left in the image store {self.store.root}"
                ) from None
            raise

    def _fetch_layer_once(self, client: RegistryClient, descriptor: dict[str, Any], diff_id: str, unwanted: Callable[[], str]) -> None:
        digest = str(descriptor.get("digest", ""))
        with self.store.layer_lock(diff_id):
            if self.store.has_layer(diff_id):
                return
            blob_path = self.store.temp_path("blob")
            staging = None
            try:
                with self._download_slots.slot(client.endpoint.host, unwanted, f"layer {digest}"):
                    with open(blob_path, "wb") as output:
                        guarded = GuardedWriter(output, self.reserve, f"layer {digest}")
                        client.download_blob(digest, guarded, int(descriptor["size"]), unwanted)  # type: ignore[arg-type]
                staging = self.store.make_layer_staging()
                limits = UnpackLimits(self.settings.max_layer_size, lambda: self.reserve.require(0, f"layer {digest}"))
                actual_diff_id, tar_size = unpack_layer(str(blob_path), str(staging / "diff"), digest, limits)
                if actual_diff_id != diff_id:
                    raise FailedPrecondition(
                        f"layer {digest}: its content is {actual_diff_id}, but the image config promises {diff_id}; "
                        "nothing was stored"
                    )
                self.store.commit_layer(
                    staging, diff_id,
                    {"diff_id": diff_id, "digest": digest, "media_type": descriptor.get("mediaType", ""), "size": tar_size},
                )
            finally:
                blob_path.unlink(missing_ok=True)
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)

    # --- record -------------------------------------------------------------------

    def _commit_image(self, reference: Reference, resolved: Resolved, diff_ids: list[str]) -> dict[str, Any]:
        image_id = resolved.config_digest
        tag = reference.tagged() if not reference.digest else ""
        repo_digest = reference.with_digest(resolved.top_digest)
        with self.store.lock:
            for digest, body in resolved.manifest_blobs.items():
                self.store.put_blob(digest, body)
            self.store.put_blob(image_id, resolved.config_bytes)
            if tag:
                # A tag names one image: it moves from the image it named before.
                for other in self.store.list_images():
                    if other["id"] != image_id and tag in other.get("repo_tags", []):
                        other["repo_tags"].remove(tag)
                        self.store.put_image(other)
            record = self.store.get_image(image_id) or {
                "id": image_id,
                "repo_tags": [],
                "repo_digests": [],
                "layers": diff_ids,
                "blobs": [],
                "created_at": time.time_ns(),
            }
            if tag and tag not in record["repo_tags"]:
                record["repo_tags"].append(tag)
            if repo_digest not in record["repo_digests"]:
                record["repo_digests"].append(repo_digest)
            record["blobs"] = sorted(set(record["blobs"]) | set(resolved.manifest_blobs) | {image_id})
            record["manifest_digest"] = resolved.manifest_digest
            record["size"] = sum(int(self.store.layer_record(diff_id).get("size", 0)) for diff_id in set(diff_ids))
            record["pulled_at"] = time.time_ns()
            self.store.put_image(record)
        return record
