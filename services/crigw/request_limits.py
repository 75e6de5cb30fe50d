"""Lengths of ids and names a CRI request may carry, checked before any call.

An id or a name far longer than any real one can only be a mistake or an
attack; sent on to a daemon it costs a full lookup and comes back echoed in
an error (issue 15 item 11). The limits are what the CRI and Kubernetes need:
- ids (container_id, pod_sandbox_id, filter ids): 64 characters, the length
  of a full id (shorter unique prefixes are accepted, as CRI-O does);
- a pod's name and uid: 253, a DNS subdomain (Kubernetes object names; a
  uid is a 36-character UUID, a static pod's a 32-character hash);
- a pod's namespace and a container's name: 63, a DNS label (RFC 1123), as
  the API server validates them;
- an image reference: 1024, above a name's 255 plus a 128-character tag and
  a sha512 digest.
Only the length and the absence of control characters are checked here: the
other characters of a name are the API server's business, and crictl users
may use others.
"""

from __future__ import annotations

from google.protobuf.message import Message

from common.errors import InvalidArgument

MAX_ID_LENGTH = 64
MAX_DNS_SUBDOMAIN_LENGTH = 253
MAX_DNS_LABEL_LENGTH = 63
MAX_IMAGE_REFERENCE_LENGTH = 1024

# Fields named so in any message: the id of a container or a pod.
ID_FIELDS = {"container_id", "pod_sandbox_id"}

# (message name, field name) -> longest value accepted.
FIELD_LIMITS: dict[tuple[str, str], int] = {
    ("PodSandboxFilter", "id"): MAX_ID_LENGTH,
    ("ContainerFilter", "id"): MAX_ID_LENGTH,
    ("ContainerStatsFilter", "id"): MAX_ID_LENGTH,
    ("PodSandboxStatsFilter", "id"): MAX_ID_LENGTH,
    ("PodSandboxMetadata", "name"): MAX_DNS_SUBDOMAIN_LENGTH,
    ("PodSandboxMetadata", "uid"): MAX_DNS_SUBDOMAIN_LENGTH,
    ("PodSandboxMetadata", "namespace"): MAX_DNS_LABEL_LENGTH,
    ("ContainerMetadata", "name"): MAX_DNS_LABEL_LENGTH,
    ("ImageSpec", "image"): MAX_IMAGE_REFERENCE_LENGTH,
    ("ImageSpec", "user_specified_image"): MAX_IMAGE_REFERENCE_LENGTH,
}


def check_request_limits(request: Message) -> None:
    """InvalidArgument naming the first id or name longer than its limit."""
    _check(request, request.DESCRIPTOR.name)


def _check(message: Message, path: str) -> None:
    message_name = message.DESCRIPTOR.name
    for field, value in message.ListFields():
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                continue  # labels and annotations: the API server bounds them
            items = value if field.is_repeated else [value]
            for index, item in enumerate(items):
                _check(item, f"{path}.{field.name}" + (f"[{index}]" if field.is_repeated else ""))
            continue
        if field.type != field.TYPE_STRING or field.is_repeated:
            continue
        limit = MAX_ID_LENGTH if field.name in ID_FIELDS else FIELD_LIMITS.get((message_name, field.name))
        if limit is not None and len(value) > limit:
            raise InvalidArgument(
                f"{path}.{field.name} is {len(value)} characters long; at most {limit} are accepted"
            )
        # A NUL or a line break in an id or a name reaches file names, CNI
        # arguments and log lines, where it cannot be represented.
        if limit is not None and any(ord(char) < 0x20 or char == "\x7f" for char in value):
            raise InvalidArgument(f"{path}.{field.name} contains a control character (NUL, line break, ...)")
