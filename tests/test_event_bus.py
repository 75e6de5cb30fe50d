"""common/event_bus.py without a stack: events arrive in order, and every way
of missing some (a skipped sequence number, a publisher restart, silence)
is reported as a gap."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common.event_bus import EventPublisher, EventSubscriber, Gap
from tests.harness import wait_until


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.gaps: list[Gap] = []


def subscribed(endpoint: str) -> tuple[EventSubscriber, Recorder]:
    recorder = Recorder()
    subscriber = EventSubscriber(endpoint, "test", recorder.events.append, recorder.gaps.append)
    subscriber.start()
    return subscriber, recorder


def test_events_in_order_then_gaps_for_a_skip_a_restart_and_silence() -> None:
    directory = Path(tempfile.mkdtemp(prefix="pyrio-bus-"))
    endpoint = f"ipc://{directory / 'rpc' / 'test-events.sock'}"
    publisher = EventPublisher(endpoint)
    subscriber, recorder = subscribed(endpoint)
    try:
        wait_until(lambda: subscriber.synced, 10, what="subscriber hears heartbeats")
        for index in range(5):
            publisher.publish("container", {"n": index})
        wait_until(lambda: len(recorder.events) == 5, 10, what="five events")
        assert [event["n"] for event in recorder.events] == list(range(5))
        assert recorder.gaps == []

        publisher._seq += 2  # two events "lost" on the way
        publisher.publish("container", {"n": 99})
        wait_until(lambda: recorder.gaps, 10, what="a gap for skipped numbers")
        assert "were not received" in recorder.gaps[0].reason

        publisher.close()
        publisher = EventPublisher(endpoint)  # a restart: a new epoch
        # PUB/SUB loses what is sent before the subscriber is back: that is
        # what the gap just reported covers.
        wait_until(lambda: subscriber.synced and subscriber.epoch == publisher.epoch, 10,
                   what="subscriber hears the new publisher")
        publisher.publish("container", {"n": 100})
        wait_until(lambda: any(event["n"] == 100 for event in recorder.events), 10, what="the new epoch's event")
        assert any("restarted" in gap.reason or "disconnected" in gap.reason for gap in recorder.gaps[1:])

        publisher.close()
        count = len(recorder.gaps)
        wait_until(lambda: len(recorder.gaps) > count, 10, what="a gap for a silent publisher")
        assert not subscriber.synced
        time.sleep(0.1)
    finally:
        subscriber.stop()
        publisher.close()
        shutil.rmtree(directory, ignore_errors=True)
