"""~300 seeded fuzzed and mutated CRI calls over every RPC against the shared
stack (issue 15): none may answer INTERNAL or UNKNOWN, and every service is
still up, with the same PID, afterwards. The full run is `bench fuzz`."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from tests.cri_fuzz import METHODS, Anchors, CriFuzzer
from tests.cri_fuzz_run import fuzz, make_anchors, services_running, sweep
from tests.harness import Stack
from tests.oci_images import PushedImage

CALLS = 300
SEED = 1515


def test_fuzzer_is_seeded_and_covers_every_rpc(tmp_path) -> None:
    anchors = Anchors(image="127.0.0.1:1/x:y", registry_host="127.0.0.1:1", scratch=tmp_path, cgroup_parent="/p",
                      pod_sandbox_id="p" * 64, container_id="c" * 64)
    first = [CriFuzzer(7, anchors).request(method) for method in METHODS]
    again = [CriFuzzer(7, anchors).request(method) for method in METHODS]
    assert [r.SerializeToString() for r in first] == [r.SerializeToString() for r in again]
    assert {m.containing_service.name for m in METHODS} == {"RuntimeService", "ImageService"}
    assert len(METHODS) >= 35


def test_fuzzed_requests_stay_on_the_test_registry_and_scratch_dir(tmp_path) -> None:
    anchors = Anchors(image="127.0.0.1:1/x:y", registry_host="127.0.0.1:1", scratch=tmp_path, cgroup_parent="/p")
    fuzzer = CriFuzzer(3, anchors)
    for _ in range(400):
        for request_type in ("PullImage", "CreateContainer", "RunPodSandbox"):
            request = fuzzer.request(next(m for m in METHODS if m.name == request_type))
            if request_type == "PullImage" and request.image.image:
                assert request.image.image.startswith("127.0.0.1:1/")
            if request_type == "CreateContainer":
                assert all(m.host_path.startswith(str(tmp_path)) or not m.host_path.startswith("/")
                           for m in request.config.mounts)
            if request_type == "RunPodSandbox" and request.config.linux.cgroup_parent:
                assert request.config.linux.cgroup_parent.startswith("/p/")


def test_fuzzed_calls_answer_no_internal_and_leave_services_up(stack: Stack, pulled_busybox: PushedImage) -> None:
    pids_before = services_running(stack)
    anchors = make_anchors(stack, pulled_busybox.reference, registry_host=pulled_busybox.reference.split("/", 1)[0])
    anchors.max_wait_s = 5
    try:
        report = fuzz(stack, anchors, CALLS, SEED, budget_s=600)
    finally:
        sweep(stack, keep=None)
        # The shared stack's other tests expect busybox pulled.
        stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=pulled_busybox.reference)),
                               timeout=120)
    assert report.calls == CALLS
    assert len(report.by_method) == len(METHODS)
    assert report.bad == [], "\n" + "\n".join(f"{code} {method}: {details} <- {request}"
                                              for method, code, details, request in report.bad)
    assert services_running(stack) == pids_before
    assert stack.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name
