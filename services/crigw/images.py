"""Image RPCs: PullImage, ImageStatus, ListImages, RemoveImage, ImageFsInfo.

imaged owns images; these handlers validate, convert and forward.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

from cri_api.v1 import api_pb2

from common.errors import InvalidArgument, PyrioError
from services.crigw.convert import dict_to_message, message_to_dict
from services.crigw.gateway import Gateway
from services.crigw.handlers import call_time_remaining, cri_handler, on_call_end

# A pull lasts as long as its caller waits (the kubelet sets no deadline):
# imaged detects stalled and too slow downloads, so this bounds the rest.
PULL_TIMEOUT_SECONDS = 3600.0
# ImageFsInfo walks the store.
FS_INFO_TIMEOUT_SECONDS = 120.0


def _image_name(spec: api_pb2.ImageSpec, what: str) -> str:
    if not spec.image.strip():
        raise InvalidArgument(f"{what}: image.image must name an image")
    return spec.image


def _image(record: dict[str, Any]) -> api_pb2.Image:
    image = dict(record)
    # imaged says uid: <int> or nothing; the CRI wraps it (unset = no numeric user).
    uid = image.pop("uid", None)
    if uid is not None:
        image["uid"] = {"value": uid}
    return dict_to_message(image, api_pb2.Image)


def _filesystem_usage(usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "timestamp": usage["timestamp"],
        "fs_id": usage["fs_id"],
        "used_bytes": {"value": usage["used_bytes"]},
        "inodes_used": {"value": usage["inodes_used"]},
    }


@cri_handler("PullImage")
def pull_image(gateway: Gateway, request: api_pb2.PullImageRequest) -> api_pb2.PullImageResponse:
    params: dict[str, Any] = {"image": _image_name(request.image, "PullImage")}
    if request.HasField("auth"):
        params["auth"] = message_to_dict(request.auth)
    # imaged stops the pull's downloads once no caller waits: every deadline
    # passed, or (the kubelet sets none) every caller cancelled its call.
    params["waiter"] = uuid.uuid4().hex
    answered = threading.Event()

    def abandon_unless_answered() -> None:
        if answered.is_set():
            return
        try:
            gateway.imaged.call("image.pull_abandon", {"waiter": params["waiter"]}, timeout=5)
        except PyrioError:
            pass  # imaged restarting: the pull it ran is gone anyway

    on_call_end(abandon_unless_answered)
    try:
        reply = gateway.imaged.call("image.pull", params, timeout=call_time_remaining(PULL_TIMEOUT_SECONDS))
    finally:
        answered.set()
    return api_pb2.PullImageResponse(image_ref=reply["image_ref"])


@cri_handler("ImageStatus")
def image_status(gateway: Gateway, request: api_pb2.ImageStatusRequest) -> api_pb2.ImageStatusResponse:
    reply = gateway.imaged.call(
        "image.status",
        {"image": _image_name(request.image, "ImageStatus"), "verbose": request.verbose},
        idempotent=True,
    )
    if reply["image"] is None:
        return api_pb2.ImageStatusResponse()
    response = api_pb2.ImageStatusResponse(image=_image(reply["image"]))
    if request.verbose and reply.get("info"):
        # As CRI-O and containerd: one "info" entry holding the runtime's view as JSON.
        response.info["info"] = json.dumps(reply["info"], sort_keys=True)
    return response


@cri_handler("ListImages")
def list_images(gateway: Gateway, request: api_pb2.ListImagesRequest) -> api_pb2.ListImagesResponse:
    filter_image = request.filter.image.image if request.HasField("filter") else ""
    records = gateway.imaged.call("image.list", {"filter_image": filter_image}, idempotent=True)
    return api_pb2.ListImagesResponse(images=[_image(record) for record in records])


@cri_handler("RemoveImage")
def remove_image(gateway: Gateway, request: api_pb2.RemoveImageRequest) -> api_pb2.RemoveImageResponse:
    gateway.imaged.call("image.remove", {"image": _image_name(request.image, "RemoveImage")}, idempotent=True)
    return api_pb2.RemoveImageResponse()


@cri_handler("ImageFsInfo")
def image_fs_info(gateway: Gateway, request: api_pb2.ImageFsInfoRequest) -> api_pb2.ImageFsInfoResponse:
    reply = gateway.imaged.call("image.fs_info", {}, timeout=FS_INFO_TIMEOUT_SECONDS, idempotent=True)
    return dict_to_message(
        {key: [_filesystem_usage(usage) for usage in reply.get(key, [])] for key in ("image_filesystems", "container_filesystems")},
        api_pb2.ImageFsInfoResponse,
    )
