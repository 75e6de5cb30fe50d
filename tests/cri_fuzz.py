"""Seeded generation of hostile CRI requests, generically from the cri_api
runtime.v1 descriptors (issue 15: "over 7,900 fuzzed and mutated CRI calls").

`CriFuzzer.request(method)` returns either a random message of the method's
request type (random strings incl. huge, NUL, newline, unicode; random ints
incl. negatives and 2^63-1; random enum values; nested and repeated messages;
maps) or a valid request with one to three fields mutated, so that calls get
past the first checks and deep into the daemons.

Whatever would reach outside the test's own stack is pinned back before a
request is sent (`_confine`): images only from the test registry, host paths,
log and checkpoint locations under a scratch dir, cgroup parents under the
stack's private parent, host ports only ones that are free now. The hostile
parts of the values (NUL, newline, `..`, huge) are kept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cri_api.v1 import api_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from tests.fixtures_images import free_port

RUNTIME_SERVICE = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
IMAGE_SERVICE = api_pb2.DESCRIPTOR.services_by_name["ImageService"]
METHODS: tuple[MethodDescriptor, ...] = (*RUNTIME_SERVICE.methods, *IMAGE_SERVICE.methods)

INT_EDGES = (0, 1, -1, 2, 255, 1023, 1024, 65535, 65536, 2**31 - 1, -(2**31), 2**32, 2**63 - 1, -(2**63), 262145, -1001)
STRING_SEEDS = (
    "", " ", "a", "\x00", "a\x00b", "\n", "x\ny", "\r\n", "..", "../..", "/../../..", "/", "/dev/zero", "/proc/self/mem",
    "%s%n", "${HOME}", "ü", "\u202e", "日本語", "😀", "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
    "-1", "0", "99999999999999999999", "0-1000000", "1,,2", "sha256:", "sha256:" + "0" * 64, "a" * 64, "A" * 300,
    "name:tag@sha256:zz", "::1", "127.0.0.1", "999.1.1.1", "localhost", "k=v", "=", "*", ";rm -rf /",
)
HUGE_SIZES = (4096, 65536, 1 << 20, 3 << 20)


def _is_map(descriptor: FieldDescriptor) -> bool:
    return descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry


@dataclass
class Anchors:
    """What valid requests point at: a running pod and container of the stack,
    the image pulled into it, and where the fuzzer may write."""

    image: str
    registry_host: str
    scratch: Path
    cgroup_parent: str
    # Where set, StopContainer / ExecSync timeouts above it are cut to it: on a
    # shared stack a stop that waits for hours blocks later calls on that container.
    max_wait_s: int | None = None
    pod_sandbox_id: str = ""
    container_id: str = ""
    pod_config: api_pb2.PodSandboxConfig = field(default_factory=api_pb2.PodSandboxConfig)
    container_config: api_pb2.ContainerConfig = field(default_factory=api_pb2.ContainerConfig)


class CriFuzzer:
    def __init__(self, seed: int, anchors: Anchors) -> None:
        self.rng = random.Random(seed)
        self.anchors = anchors

    # --- random values -------------------------------------------------

    def string(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.005:
            return rng.choice("ab\x00\n") * rng.choice(HUGE_SIZES)
        if roll < 0.4:
            return rng.choice(STRING_SEEDS)
        if roll < 0.6:
            return rng.choice(STRING_SEEDS) + rng.choice(STRING_SEEDS) + rng.choice(STRING_SEEDS)
        if roll < 0.8:
            return "".join(chr(rng.randint(1, 0x2FF)) for _ in range(rng.randint(1, 40)))
        if roll < 0.9:
            return (self.anchors.container_id or "c" * 64)[: rng.randint(1, 64)]
        return rng.choice(("id", "pod", "main", "pyrio-test")) + rng.choice(("", "-1", "\x00", "\n", "/x"))

    def integer(self, descriptor: FieldDescriptor) -> int:
        value = self.rng.choice(INT_EDGES) if self.rng.random() < 0.6 else self.rng.randint(-(2**40), 2**40)
        bits = 64 if descriptor.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                                         FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64) else 32
        if descriptor.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32,
                               FieldDescriptor.TYPE_FIXED64):
            return value % (2**bits)
        return max(-(2 ** (bits - 1)), min(2 ** (bits - 1) - 1, value))

    def scalar(self, descriptor: FieldDescriptor) -> Any:
        kind = descriptor.cpp_type
        if kind == FieldDescriptor.CPPTYPE_STRING:
            text = self.string()
            return text.encode("utf-8", "replace") if descriptor.type == FieldDescriptor.TYPE_BYTES else text
        if kind == FieldDescriptor.CPPTYPE_BOOL:
            return self.rng.random() < 0.5
        if kind in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
            return self.rng.choice((0.0, -1.0, 1e308, float("nan"), float("inf")))
        if kind == FieldDescriptor.CPPTYPE_ENUM:
            values = [value.number for value in descriptor.enum_type.values]
            return self.rng.choice(values) if self.rng.random() < 0.7 else self.rng.choice((-1, 99, 2**31 - 1))
        return self.integer(descriptor)

    def fill(self, message: Message, depth: int = 0) -> Message:
        """Set a random subset of `message`'s fields to random values."""
        for descriptor in message.DESCRIPTOR.fields:
            if self.rng.random() < 0.45:
                self.set_field(message, descriptor, depth)
        return message

    def set_field(self, message: Message, descriptor: FieldDescriptor, depth: int) -> None:
        rng = self.rng
        count = rng.choice((0, 1, 1, 2, 3, 40)) if depth < 3 else rng.choice((0, 1))
        if _is_map(descriptor):
            entries = getattr(message, descriptor.name)
            value_field = descriptor.message_type.fields_by_name["value"]
            for _ in range(count):
                key = self.scalar(descriptor.message_type.fields_by_name["key"])
                if value_field.message_type is None:
                    entries[key] = self.scalar(value_field)
                elif depth < 4:
                    self.fill(entries[key], depth + 1)
        elif descriptor.is_repeated:
            items = getattr(message, descriptor.name)
            for _ in range(count):
                if descriptor.message_type is None:
                    items.append(self.scalar(descriptor))
                elif depth < 4:
                    self.fill(items.add(), depth + 1)
        elif descriptor.message_type is not None:
            if depth < 5:
                child = getattr(message, descriptor.name)
                child.SetInParent()
                self.fill(child, depth + 1)
        else:
            setattr(message, descriptor.name, self.scalar(descriptor))

    # --- valid requests, mutated ---------------------------------------

    def valid(self, request_type: Descriptor) -> Message:
        """A request of this type that a CRI client could send, pointing at the anchors."""
        anchors = self.anchors
        request = api_pb2.__dict__[request_type.name]()
        if request_type.name == "RunPodSandboxRequest":
            request.config.CopyFrom(anchors.pod_config)
            request.config.metadata.uid = f"fuzz-{self.rng.getrandbits(48):x}"
            request.config.metadata.name = f"fuzz-{self.rng.getrandbits(32):x}"
        elif request_type.name == "CreateContainerRequest":
            request.pod_sandbox_id = anchors.pod_sandbox_id
            request.config.CopyFrom(anchors.container_config)
            request.config.metadata.name = f"fuzz-{self.rng.getrandbits(32):x}"
            request.sandbox_config.CopyFrom(anchors.pod_config)
        for name, value in (("container_id", anchors.container_id), ("pod_sandbox_id", anchors.pod_sandbox_id)):
            if name in request_type.fields_by_name and not getattr(request, name):
                setattr(request, name, value)
        if "image" in request_type.fields_by_name:
            request.image.image = anchors.image
        if request_type.name == "ExecSyncRequest":
            request.cmd.extend(["true"])
            request.timeout = 5
        if request_type.name in ("ExecRequest", "AttachRequest"):
            request.stdout = True
        if request_type.name == "StopContainerRequest":
            request.timeout = 1
        return request

    def mutate(self, message: Message) -> None:
        """Change one field somewhere in `message` (set or not) to a random value."""
        spots: list[tuple[Message, FieldDescriptor, int]] = []

        def walk(node: Message, depth: int) -> None:
            for descriptor in node.DESCRIPTOR.fields:
                spots.append((node, descriptor, depth))
                if descriptor.message_type is not None and not _is_map(descriptor) and depth < 5:
                    if descriptor.is_repeated:
                        for item in getattr(node, descriptor.name):
                            walk(item, depth + 1)
                    elif node.HasField(descriptor.name):
                        walk(getattr(node, descriptor.name), depth + 1)

        walk(message, 0)
        if not spots:  # a request without fields: nothing to mutate
            return
        node, descriptor, depth = self.rng.choice(spots)
        if self.rng.random() < 0.15:
            node.ClearField(descriptor.name)
        else:
            if descriptor.is_repeated and self.rng.random() < 0.5:
                node.ClearField(descriptor.name)
            self.set_field(node, descriptor, depth)

    def request(self, method: MethodDescriptor) -> Message:
        if self.rng.random() < 0.4:
            request = self.fill(api_pb2.__dict__[method.input_type.name]())
        else:
            request = self.valid(method.input_type)
            for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
                self.mutate(request)
        self._confine(request)
        return request

    # --- keep the node safe ----------------------------------------------

    def _confine(self, message: Message) -> None:
        anchors = self.anchors
        for descriptor, value in list(message.ListFields()):
            if descriptor.message_type is not None and not _is_map(descriptor):
                for child in (value if descriptor.is_repeated else [value]):
                    self._confine(child)
                continue
            if descriptor.cpp_type != FieldDescriptor.CPPTYPE_STRING or descriptor.is_repeated:
                if message.DESCRIPTOR.name == "PortMapping" and descriptor.name == "host_port" and 0 < value <= 65535:
                    message.host_port = free_port()
                if (anchors.max_wait_s is not None and descriptor.name == "timeout" and value > anchors.max_wait_s
                        and message.DESCRIPTOR.name in ("StopContainerRequest", "ExecSyncRequest")):
                    message.timeout = anchors.max_wait_s
                continue
            owner, name = message.DESCRIPTOR.name, descriptor.name
            if owner == "ImageSpec" and name == "image" and value != anchors.image:
                # Never a pull from the internet: a hostile name, but of the test registry.
                message.image = f"{anchors.registry_host}/{value}"
            elif (owner, name) in (("Mount", "host_path"), ("Device", "host_path"), ("PodSandboxConfig", "log_directory"),
                                   ("CheckpointContainerRequest", "location")) and value.startswith("/"):
                setattr(message, name, f"{anchors.scratch}{value}")
            elif name == "cgroup_parent" and not value.startswith(anchors.cgroup_parent + "/"):
                # Under the stack's own parent, which its clean-up removes; `..` and NUL stay.
                setattr(message, name, f"{anchors.cgroup_parent}/{value.lstrip('/')}")
