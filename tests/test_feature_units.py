"""Unit tests beside the socket tests of issue 12's features: mapping checks,
mountinfo propagation, pod limits and the runtime probe."""

from __future__ import annotations

import pytest

from common import mounts
from common.errors import InvalidArgument
from common.runtime_features import _version
from common.userns import host_id, id_map_text, mappings, user_namespace_options
from services.shimd.pod_resources import pod_limits


def mapping(container_id: int, host: int, length: int) -> dict[str, int]:
    return {"container_id": container_id, "host_id": host, "length": length}


def test_mappings_are_checked() -> None:
    good = mappings([mapping(0, 65536, 65536)], "uids")
    assert id_map_text(good) == "0 65536 65536\n" and host_id(good, 0) == 65536 and host_id(good, 65536) is None
    for bad, needle in (([], "needs uids"), ([mapping(0, 1, 0)], "positive length"), ([mapping(5, 1, 1)], "container_id 0"),
                        ([mapping(0, 10, 10), mapping(10, 15, 10)], "overlap"),
                        ([mapping(0, (1 << 32) - 5, 10)], "range leaves")):
        with pytest.raises(InvalidArgument, match=needle):
            mappings(bad, "uids")


def test_user_namespace_options_modes() -> None:
    assert user_namespace_options({}) is None
    assert user_namespace_options({"namespace_options": {"userns_options": {"mode": 2}}}) is None
    with pytest.raises(InvalidArgument, match="mode NODE takes no"):
        user_namespace_options({"namespace_options": {"userns_options": {"mode": 2, "uids": [mapping(0, 1, 1)]}}})
    with pytest.raises(InvalidArgument, match="POD or NODE"):
        user_namespace_options({"namespace_options": {"userns_options": {"mode": 1}}})
    both = [mapping(0, 65536, 65536)]
    assert user_namespace_options({"namespace_options": {"userns_options": {"uids": both, "gids": both}}}) == {"uids": both, "gids": both}


def test_mount_of_reads_propagation_fields(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "1 0 8:1 / / rw - ext4 /dev/sda rw\n"
        "2 1 8:1 /srv /srv rw shared:5 - ext4 /dev/sda rw\n"
        "3 2 0:40 / /srv/with\\040space rw master:5 - tmpfs tmpfs rw\n"
    )
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *args, **kwargs: real_open(info if path == "/proc/self/mountinfo" else path, *args, **kwargs))
    monkeypatch.setattr(mounts.os.path, "realpath", lambda path: path)
    assert mounts.mount_of("/etc/x") == mounts.MountEntry("/", shared=False, slave=False)
    assert mounts.mount_of("/srv/data").shared
    slave = mounts.mount_of("/srv/with space/f")
    assert slave.mount_point == "/srv/with space" and slave.slave and not slave.shared
    assert mounts.mount_of("/srvx").mount_point == "/"


def test_pod_limits_add_the_overhead() -> None:
    assert pod_limits({"memory_limit_in_bytes": 100, "cpu_quota": 50, "cpu_period": 100000, "cpu_shares": 20},
                      {"memory_limit_in_bytes": 10, "cpu_shares": 2}) == {
        "memory_limit_in_bytes": 110, "cpu_quota": 50, "cpu_period": 100000, "cpu_shares": 22}
    # An unlimited pod stays unlimited whatever its overhead.
    assert pod_limits({}, {"memory_limit_in_bytes": 10}) == {}
    assert pod_limits({"cpu_shares": 2}, {"cpu_quota": 5}) == {"cpu_shares": 2}


def test_runtime_versions() -> None:
    assert _version("crun version 1.8.1\ncommit: x") == (1, 8, 1)
    assert _version("runc version 1.1.5+ds1") == (1, 1, 5)
    assert _version("nothing") == ()
