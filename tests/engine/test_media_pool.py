"""The media pool: its own threads, a bounded queue with a bounded wait, and cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from glimpse.engine.media_pool import MediaPool, ServerBusyError
from glimpse.processing.media import Cancellation


def blocker(release: threading.Event, cancelled: list[bool] | None = None):
    """Work that holds its worker until `release` (or its cancellation) is set."""

    def work(cancel: Cancellation) -> str:
        while not release.wait(0.01):
            if cancel.is_set():
                if cancelled is not None:
                    cancelled.append(True)
                return "cancelled"
        return "done"

    return work


def test_work_runs_on_a_pool_thread_and_errors_pass_through():
    pool = MediaPool(workers=2)

    def fail(cancel: Cancellation) -> None:
        raise ValueError("bad media")

    async def main() -> str:
        name = await pool.run(lambda cancel: threading.current_thread().name)
        with pytest.raises(ValueError, match="bad media"):
            await pool.run(fail)
        return name

    assert asyncio.run(main()).startswith("glimpse-media")
    pool.shutdown()


def test_a_full_pool_refuses_at_once_and_a_queued_request_waits_a_bounded_time():
    pool = MediaPool(workers=1, queue=1, queue_wait_s=0.3)
    release = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        busy = asyncio.ensure_future(pool.run(blocker(release)))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(pool.run(lambda cancel: ran.append("queued")))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(ServerBusyError, match="busy") as err:
            await pool.run(lambda cancel: ran.append("third"))
        assert err.value.status == 503 and time.monotonic() - started < 0.5
        with pytest.raises(ServerBusyError, match="waited 0.3 s"):
            await queued
        release.set()
        assert await busy == "done"
        assert await pool.run(lambda cancel: "after") == "after"  # the refused ones left no trace

    asyncio.run(main())
    assert ran == []  # neither refused request ran
    pool.shutdown()


def test_cancelling_the_waiting_task_cancels_the_work():
    pool = MediaPool(workers=1, queue=4)
    release = threading.Event()
    cancelled: list[bool] = []
    ran: list[str] = []

    async def main() -> None:
        running = asyncio.ensure_future(pool.run(blocker(release, cancelled)))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(pool.run(lambda cancel: ran.append("queued")))
        await asyncio.sleep(0.05)
        for task in (queued, running):
            task.cancel()
        await asyncio.gather(queued, running, return_exceptions=True)
        deadline = time.monotonic() + 2
        while not cancelled and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert await pool.run(lambda cancel: "free again") == "free again"

    asyncio.run(main())
    assert cancelled == [True] and ran == []
    pool.shutdown()


def test_shutdown_cancels_the_work_in_flight():
    pool = MediaPool(workers=1)
    cancelled: list[bool] = []
    release = threading.Event()
    done = threading.Event()

    def run() -> None:
        asyncio.run(pool.run(blocker(release, cancelled)))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    time.sleep(0.1)
    pool.shutdown()
    assert done.wait(2) and cancelled == [True]
