"""The trial's wait for Tune to take the Train run's forwarded reports before it reports itself (Ray 2.60 deadlocks
a trial actor whose function reports while a forwarded report is still queued)."""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

from whisper_lora.tune.trainable import forwarded_reports_taken


def _session(forwarded: queue.Queue | None) -> SimpleNamespace:
    return SimpleNamespace(_inter_actor_queue=forwarded, result_queue=queue.Queue(1))


def test_the_trial_reports_only_after_tune_took_the_last_forwarded_report():
    forwarded = queue.Queue(1)
    forwarded.put({"report_kind": "evaluation"})  # the controller's last report, not yet taken
    session = _session(forwarded)
    taken_at = []

    def tune_main_thread() -> None:  # takes it later, as Tune's main thread does between two results
        time.sleep(0.3)
        session.result_queue.put(forwarded.get())
        time.sleep(0.1)
        session.result_queue.get()
        taken_at.append(time.monotonic())

    thread = threading.Thread(target=tune_main_thread)
    thread.start()
    assert forwarded_reports_taken(session, settle_s=0.1, poll_s=0.01)
    thread.join()
    assert taken_at and time.monotonic() >= taken_at[0] + 0.1  # waited for the take and then settled


def test_nothing_forwarded_returns_after_the_settle_time_and_a_stuck_queue_times_out():
    started = time.monotonic()
    assert forwarded_reports_taken(_session(None), settle_s=0.05, poll_s=0.01)
    assert time.monotonic() - started < 1.0
    stuck = queue.Queue(1)
    stuck.put({})
    assert not forwarded_reports_taken(_session(stuck), settle_s=0.05, timeout_s=0.2, poll_s=0.01)
