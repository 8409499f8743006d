"""The numbers of a sweep's pages: spreads, the best method of each budget, the sweep's
status, a run's time left."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from app.experiments import (
    budget_table,
    eta_seconds,
    experiment_status,
    run_shape,
    seconds_per_step,
    times_left,
)
from app.models import Dataset, Run
from app.routers.pages import time_left_text
from app.schemas import TimeLeft


def run(method: str, status: str = "succeeded", top1: float | None = None,
        budget: float = 0.15) -> Run:
    metrics = {"test_top1": top1} if top1 is not None else {}
    return Run(method=method, budget=budget, budget_label=f"{budget * 100:g}%", seed=0,
               status=status, metrics=metrics)


def best_methods(runs: list[Run]) -> set[str]:
    return {row["method"] for row in budget_table(runs) if row["best"]}


def test_one_seed_has_no_spread_and_two_have_the_sample_one():
    rows = {row["method"]: row for row in budget_table([
        run("fine-tune", top1=0.80),
        run("self-tuning", top1=0.80), run("self-tuning", top1=0.90),
    ])}
    assert rows["fine-tune"]["std_top1"] is None
    assert rows["self-tuning"]["std_top1"] == pytest.approx(0.0707107, abs=1e-6)


def test_methods_that_read_alike_are_each_the_best():
    assert best_methods([run("fine-tune", top1=0.80), run("self-tuning", top1=0.80)]) == {
        "fine-tune", "self-tuning"}
    # 80.04% and 80.01% both show as 80.0%
    assert best_methods([run("fine-tune", top1=0.8004), run("self-tuning", top1=0.8001)]) == {
        "fine-tune", "self-tuning"}
    assert best_methods([run("fine-tune", top1=0.80), run("self-tuning", top1=0.81)]) == {
        "self-tuning"}
    # 81.25% shows as 81.3% (half up, as the page rounds; round() gave 0.812): a tie
    assert best_methods([run("fine-tune", top1=0.8125), run("self-tuning", top1=0.8130)]) == {
        "fine-tune", "self-tuning"}


def test_one_lucky_seed_does_not_beat_a_method_whose_seeds_all_finished():
    runs = [
        run("fine-tune", top1=0.90), run("fine-tune", status="failed"),
        run("fine-tune", status="running"),
        *(run("self-tuning", top1=top1) for top1 in (0.85, 0.86, 0.87)),
    ]
    assert best_methods(runs) == {"self-tuning"}


def test_each_budget_has_its_own_best():
    runs = [run("fine-tune", top1=0.7, budget=0.05), run("self-tuning", top1=0.8, budget=0.05),
            run("fine-tune", top1=0.9, budget=0.5), run("self-tuning", top1=0.85, budget=0.5)]
    assert {(row["budget_label"], row["method"]) for row in budget_table(runs) if row["best"]} \
        == {("5%", "self-tuning"), ("50%", "fine-tune")}


@pytest.mark.parametrize(("statuses", "expected"), [
    (["succeeded", "succeeded"], "finished"),
    (["succeeded", "cancelled"], "partly cancelled"),
    (["cancelled", "cancelled"], "cancelled"),
    (["succeeded", "failed", "cancelled"], "finished with failures"),
    (["failed", "failed"], "failed"),  # every run failed: not "finished with failures"
    (["failed", "cancelled"], "failed"),
    (["lost"], "failed"),
    (["succeeded", "queued"], "in progress"),  # between two runs: not "queued" again
    (["queued", "queued"], "queued"),
    (["running", "queued"], "running"),
])
def test_a_sweep_with_cancelled_runs_does_not_read_finished(statuses, expected):
    assert experiment_status(Counter(statuses)) == expected


def test_the_eta_counts_the_unlabeled_batch_only_where_there_are_unlabeled_images():
    dataset = Dataset(name="d", storage_key="k", fingerprint="0" * 64, unlabeled_count=0,
                      class_counts={"a": {"train": 10, "test": 2}, "b": {"train": 10, "test": 2}})
    config = {"batch_size": 16, "unlabeled_batch_size": 16}

    def eta(method: str, budget) -> float:
        running = Run(method=method, budget=budget, status="running", images_per_s=32.0,
                      step=0, total_steps=1000, config=config)
        return eta_seconds(running, dataset)

    assert eta("self-tuning", 0.5) == eta("fixmatch", 0.5) == 1000.0  # 16 + 16 images a step
    assert eta("self-tuning", "all") == eta("fine-tune", 0.5) == 500.0  # 16 images a step
    dataset.unlabeled_count = 5  # an unlabeled/ folder: drawn from at every budget
    assert eta("self-tuning", "all") == 1000.0


def timed_run(method: str, status: str, steps: int = 100, took_s: float | None = None,
              resumed: bool = False, **fields) -> Run:
    start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    return Run(method=method, budget=0.5, status=status, total_steps=steps,
               step=fields.pop("step", steps if status == "succeeded" else 0),
               config=fields.pop("config", {"batch_size": 16, "unlabeled_batch_size": 16}),
               started_at=start if took_s is not None or status == "running" else None,
               finished_at=start + timedelta(seconds=took_s) if took_s is not None else None,
               queued_at=fields.pop("queued_at",
                                    start + timedelta(seconds=5) if resumed else start),
               **fields)


def time_left(runs: list[Run], workers: int = 1) -> TimeLeft | None:
    """The time left of one sweep, alone in the queue."""
    return times_left({1: runs}, {}, workers).get(1)


def test_a_sweeps_time_left_times_each_queued_run_by_its_methods_runs_so_far():
    runs = [timed_run("fine-tune", "succeeded", took_s=100.0),
            timed_run("fine-tune", "succeeded", took_s=300.0),
            timed_run("fine-tune", "succeeded", took_s=900.0, resumed=True),  # held a wait
            timed_run("fine-tune", "queued", steps=50),
            timed_run("fixmatch", "queued"), timed_run("fixmatch", "queued"),
            timed_run("self-tuning", "failed")]
    left = time_left(runs)
    # The median of 1 s and 3 s a step (the resumed run left out), for 50 steps.
    assert left.seconds == 100.0 and left.runs == 3
    assert (left.untimed_runs, left.untimed_methods) == (2, ["fixmatch"])

    # A running FixMatch run: its own time left at its speed (32 images a step, 64 a
    # second: 0.5 s a step), and the queued one's steps at that speed.
    runs[4] = timed_run("fixmatch", "running", step=60, images_per_s=64.0)
    left = time_left(runs)
    assert left.seconds == 100.0 + 40 * 0.5 + 100 * 0.5 and left.untimed_runs == 0

    # A running fine-tuning run: its steps left at what its method's finished runs took by
    # the clock (2 s), evaluations and export included, not at its training speed.
    # Two runs training: two workers, the queued runs each taken by the first free (20 s in).
    runs.append(timed_run("fine-tune", "running", step=90, images_per_s=1000.0))
    left = time_left(runs)
    assert left.seconds == 10 * 2.0 + 50 * 2.0 and left.workers == 2


def test_a_sweep_whose_runs_all_ended_has_no_time_left():
    assert time_left([timed_run("fine-tune", "succeeded", took_s=10.0),
                      timed_run("fine-tune", "cancelled")]) is None


def test_runs_queued_before_a_sweeps_come_first_and_workers_take_them_side_by_side():
    """One worker takes the runs of every experiment in the order they were queued: a sweep
    queued behind another waits for it. More workers each take the next run as they come
    free."""
    def queued(method: str, minutes: int, **fields) -> Run:
        return timed_run(method, "queued", queued_at=datetime(2026, 1, 1, 13, minutes, tzinfo=UTC),
                         **fields)

    first = [timed_run("fine-tune", "succeeded", took_s=100.0), queued("fine-tune", 1),
             queued("fine-tune", 2), queued("fine-tune", 3)]  # 100 s a run
    second = [timed_run("fine-tune", "succeeded", took_s=50.0), queued("fine-tune", 4)]
    assert time_left(second).seconds == 50.0  # alone in the queue
    lefts = times_left({1: first, 2: second}, {}, 1)
    assert (lefts[1].seconds, lefts[1].ahead_runs) == (300.0, 0)
    assert (lefts[2].seconds, lefts[2].ahead_runs, lefts[2].runs) == (350.0, 3, 1)
    # Two workers: 100 s and 100 s side by side, then 100 s and 50 s.
    lefts = times_left({1: first, 2: second}, {}, 2)
    assert (lefts[1].seconds, lefts[2].seconds, lefts[2].workers) == (200.0, 150.0, 2)
    assert time_left(first, workers=3).seconds == 100.0

    # A run queued again goes to the back: behind the second sweep's.
    first[1].queued_at = datetime(2026, 1, 1, 13, 5, tzinfo=UTC)
    lefts = times_left({1: first, 2: second}, {}, 1)
    assert (lefts[2].seconds, lefts[2].ahead_runs) == (250.0, 2)
    assert (lefts[1].seconds, lefts[1].ahead_runs) == (350.0, 1)

    # A running run holds its worker whatever its place; one more than the workers that
    # answer (one that stopped answering) still trains.
    second[1] = timed_run("fine-tune", "running", step=60)  # 40 steps of 0.5 s left
    lefts = times_left({1: first, 2: second}, {}, 0)
    assert (lefts[2].seconds, lefts[2].ahead_runs, lefts[2].workers) == (20.0, 0, 1)
    assert (lefts[1].seconds, lefts[1].ahead_runs) == (320.0, 1)

    # A run ahead that cannot be timed yet counts as none: the time is then at least that.
    third = [queued("self-tuning", 6)]
    lefts = times_left({1: first, 2: second, 3: third}, {}, 1)
    assert lefts[3].seconds == 320.0
    assert (lefts[3].untimed_runs, lefts[3].ahead_runs, lefts[3].ahead_untimed_runs) == (1, 4, 0)
    fourth = [queued("fine-tune", 8)]
    lefts = times_left({3: third, 4: fourth}, {}, 1)
    assert (lefts[4].seconds, lefts[4].untimed_runs, lefts[4].ahead_untimed_runs) == (0.0, 1, 1)


def test_a_method_not_finished_in_its_sweep_yet_is_timed_by_like_runs_of_other_sweeps():
    """A sweep started again with another seed knew nothing of what its runs took until one
    had finished; runs of the same method, backbone, image size and batches did."""
    earlier = [timed_run("fine-tune", "succeeded", took_s=200.0),
               timed_run("self-tuning", "succeeded", took_s=600.0),
               timed_run("fine-tune", "succeeded", took_s=100.0, config={"image_size": 224})]
    similar = seconds_per_step(earlier, key=run_shape)
    assert similar == {("fine-tune", None, None, 16, 16): 2.0,
                       ("self-tuning", None, None, 16, 16): 6.0,
                       ("fine-tune", None, 224, None, None): 1.0}
    sweep = [timed_run("fine-tune", "queued"), timed_run("self-tuning", "queued"),
             timed_run("fixmatch", "queued")]
    left = times_left({1: sweep}, {}, 1, similar)[1]
    assert (left.seconds, left.untimed_runs, left.untimed_methods) == (800.0, 1, ["fixmatch"])
    # Its own finished runs come first; the like runs' clock before a running run's speed
    # (0.5 s a step here, which leaves out evaluations and export).
    sweep.append(timed_run("fine-tune", "succeeded", took_s=50.0))
    sweep[1] = timed_run("self-tuning", "running", step=0, images_per_s=64.0)
    left = times_left({1: sweep}, {}, 1, similar)[1]
    assert left.seconds == 50.0 + 600.0 and left.runs == 3


@pytest.mark.parametrize(("seconds", "runs", "untimed", "text"), [
    (900.0, 3, 0, "about 15 min left"),
    (30.0, 1, 0, "under a minute left"),
    (7_500.0, 9, 0, "about 2 h 5 min left"),
    (900.0, 3, 2, "over 15 min left"),  # the untimed runs come on top
    (30.0, 2, 1, "a minute or more left"),
    (0.0, 3, 3, ""),  # nothing timed yet: the lists say nothing
    (600.0, 3, 3, "over 10 min left"),  # the runs ahead of them are timed
])
def test_the_lists_say_an_experiments_time_left_in_a_few_words(seconds, runs, untimed, text):
    left = TimeLeft(seconds=seconds, runs=runs, untimed_runs=untimed,
                    untimed_methods=["fixmatch"] if untimed else [])
    assert time_left_text(left) == text
    ahead_untimed = left.model_copy(update={"untimed_runs": 0, "untimed_methods": [],
                                            "ahead_runs": 2, "ahead_untimed_runs": 1})
    assert time_left_text(ahead_untimed) == (text.replace("about", "over").replace(
        "under a minute", "a minute or more") if seconds else "")
    assert time_left_text(left) == text
    assert time_left_text(None) == ""
