"""The container's user: run_as_user / run_as_username / the image's User,
resolved in the container's own /etc/passwd and /etc/group (as CRI-O does)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument
from services.shimd.request_files import read_regular_file

# CRI SupplementalGroupsPolicy.
SUPPLEMENTAL_GROUPS_MERGE, SUPPLEMENTAL_GROUPS_STRICT = 0, 1

# An image's /etc/passwd or /etc/group past this is hostile, not a user list.
MAX_USER_DB_BYTES = 4 << 20


def _rootfs_file(rootfs: str, path: str) -> Path | None:
    """A file inside the rootfs, without following a symlink out of it."""
    candidate = Path(rootfs) / path.lstrip("/")
    try:
        resolved = candidate.resolve()
    except OSError:
        return None
    root = Path(rootfs).resolve()
    if resolved != root and root not in resolved.parents:
        return None
    return resolved if resolved.is_file() else None


def _read_db(rootfs: str, path: str) -> list[list[str]]:
    found = _rootfs_file(rootfs, path)
    if found is None:
        return []
    rows = []
    text = read_regular_file(str(found), MAX_USER_DB_BYTES, f"the image's {path}").decode(errors="replace")
    for line in text.splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


@dataclass
class User:
    uid: int
    gid: int
    additional_gids: list[int]
    home: str
    name: str = ""


def resolve_user(rootfs: str, security: dict[str, Any], image_user: str) -> User:
    passwd = [row for row in _read_db(rootfs, "/etc/passwd") if len(row) >= 7]
    groups = [row for row in _read_db(rootfs, "/etc/group") if len(row) >= 3]

    def by_name(name: str) -> list[str] | None:
        return next((row for row in passwd if row[0] == name), None)

    def by_uid(uid: int) -> list[str] | None:
        return next((row for row in passwd if row[2] == str(uid)), None)

    group_spec = ""
    if "run_as_user" in security:
        uid = int(security["run_as_user"].get("value", 0))
        entry = by_uid(uid)
    elif security.get("run_as_username"):
        name = security["run_as_username"]
        entry = by_name(name)
        if entry is None:
            raise InvalidArgument(f"user {name!r} (run_as_username) is not in the image's /etc/passwd")
        uid = int(entry[2])
    else:
        user_spec, _, group_spec = (image_user or "").partition(":")
        if not user_spec:
            uid, entry = 0, by_uid(0)
        elif user_spec.isdigit():
            uid = int(user_spec)
            entry = by_uid(uid)
        else:
            entry = by_name(user_spec)
            if entry is None:
                raise InvalidArgument(f"user {user_spec!r} (the image's User) is not in the image's /etc/passwd")
            uid = int(entry[2])
    if "run_as_group" in security:
        gid = int(security["run_as_group"].get("value", 0))
    elif group_spec:
        if group_spec.isdigit():
            gid = int(group_spec)
        else:
            row = next((row for row in groups if row[0] == group_spec), None)
            if row is None:
                raise InvalidArgument(f"group {group_spec!r} (the image's User) is not in the image's /etc/group")
            gid = int(row[2])
    else:
        gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    name = entry[0] if entry is not None else ""
    policy = int(security.get("supplemental_groups_policy", SUPPLEMENTAL_GROUPS_MERGE))
    if policy not in (SUPPLEMENTAL_GROUPS_MERGE, SUPPLEMENTAL_GROUPS_STRICT):
        raise InvalidArgument(f"unknown supplemental_groups_policy {policy} (Merge is 0, Strict is 1)")
    additional: list[int] = []
    # Strict: only the primary group and the config's supplemental groups
    # (the kubelet adds fsGroup to them), never what the image's /etc/group says.
    if name and policy == SUPPLEMENTAL_GROUPS_MERGE:
        for row in groups:
            members = row[3].split(",") if len(row) > 3 else []
            if name in members and row[2].isdigit():
                additional.append(int(row[2]))
    for extra in security.get("supplemental_groups") or []:
        additional.append(int(extra))
    unique = []
    for group_id in [gid, *additional]:
        if group_id not in unique:
            unique.append(group_id)
    home = entry[5] if entry is not None and entry[5] else "/"
    return User(uid=uid, gid=gid, additional_gids=unique, home=home, name=name)
