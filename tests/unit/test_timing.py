"""Step timers (core/timing.py): steps are collected only inside a collection, add up when a
step runs twice, reach tasks and threads started inside it, and never leak between two
concurrent collections. No timed assertions: only which steps were seen, and that the
numbers are consistent with one another."""

from __future__ import annotations

import asyncio

from metald.core import timing


def test_a_step_outside_a_collection_only_runs_the_block() -> None:
    ran = []
    with timing.step("store"):
        ran.append(1)
    timing.record("jailer", 1.0)  # nowhere to go: ignored
    assert ran == [1]


def test_steps_add_up_and_keep_their_first_order() -> None:
    with timing.collecting() as times:
        with timing.step("store"):
            pass
        with timing.step("network"):
            pass
        with timing.step("store"):
            pass
        timing.record("jailer.mount", 0.25)
        timing.record("negative", -1.0)
    assert list(times.steps) == ["store", "network", "jailer.mount", "negative"]
    assert times.steps["jailer.mount"] == 0.25 and times.steps["negative"] == 0.0
    assert times.total is not None
    assert times.steps["store"] + times.steps["network"] <= times.total
    assert times.describe().startswith(f"{times.total * 1000:.1f} ms: store ")


def test_a_failing_block_is_still_timed() -> None:
    with timing.collecting() as times:
        try:
            with timing.step("check"):
                raise ValueError("bad")
        except ValueError:
            pass
    assert "check" in times.steps


async def test_tasks_and_threads_report_to_their_own_collection() -> None:
    def in_thread() -> None:
        with timing.step("thread"):
            pass

    async def create(name: str) -> timing.StepTimes:
        with timing.collecting() as times:
            with timing.step(name):
                await asyncio.sleep(0)
            await asyncio.to_thread(in_thread)
            await asyncio.create_task(_child())
        return times

    a, b = await asyncio.gather(create("a"), create("b"))
    assert list(a.steps) == ["a", "thread", "child"]
    assert list(b.steps) == ["b", "thread", "child"]
    with timing.step("after"):
        pass  # the collections ended: nothing is current
    assert "after" not in a.steps and "after" not in b.steps


async def _child() -> None:
    with timing.step("child"):
        await asyncio.sleep(0)


def test_laps_split_a_step_into_its_stages() -> None:
    timing.lap("nowhere")  # outside a collection: nothing
    with timing.collecting() as times:
        with timing.step("network"):
            timing.lap("network.netns")
            timing.lap("network.veth")
        with timing.step("store"):
            pass  # the network's last stage ended with its step
    assert list(times.steps) == ["network.netns", "network.veth", "network", "store"]
    assert times.steps["network.netns"] + times.steps["network.veth"] <= times.steps["network"]
