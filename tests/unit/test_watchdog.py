"""The watchdog exits the process only after liveness has failed for its whole grace period."""

from __future__ import annotations

import threading

from launcher.watchdog import EXIT_CODE, Watchdog


def test_exits_after_the_grace_period_of_continuous_failure() -> None:
    problems: dict[str, str] = {}
    exited = threading.Event()
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    dog = Watchdog(lambda: dict(problems), grace_s=0.2, poll_s=0.02, exit=fake_exit)
    dog.start()
    assert not exited.wait(0.3)  # healthy: never exits
    problems["decode"] = "decode-engine stopped"
    assert exited.wait(5.0) and codes == [EXIT_CODE]
    dog.stop()


def test_a_failure_that_clears_within_the_grace_period_is_forgiven() -> None:
    calls = iter([{"x": "stalled"}] * 3 + [{}] * 1000)
    codes: list[int] = []
    dog = Watchdog(lambda: next(calls), grace_s=0.5, poll_s=0.02, exit=codes.append)
    dog.start()
    threading.Event().wait(0.8)
    dog.stop()
    assert codes == []
