"""The node lane: a KVM guest with systemd as PID 1 on pure cgroup v2 (see docs/NODE.md)."""
