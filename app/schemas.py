"""Pydantic request and response models for experiments and runs (the /docs contract)."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from app.models import MAX_ID
from worker.selftuning.budgets import PER_CLASS_TEXT, Budget, BudgetError
from worker.selftuning.config import LABELED_QUERY_VIEWS, METHOD_NAMES
from worker.selftuning.labels_csv import CONTROL_CHARACTERS

MethodName = Literal[METHOD_NAMES]
RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "lost"]
RUN_STATUSES = get_args(RunStatus)  # in the order a run goes through them
# "lost" stays only once a run has used up its automatic requeues (see app.reaper).
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled", "lost")
TO_GO_STATUSES = ("queued", "running")  # a run still to train: the rest of RUN_STATUSES
# A run's error in a list of runs (an experiment's runs, its runs CSV): its first line, cut.
ERROR_LINE_MAX = 300


# JSON's "\ud800" escapes decode to half a character, which UTF-8 (a database, a page) cannot hold.
LONE_SURROGATES = re.compile(r"[\ud800-\udfff]")

# What a request body may hold: named fields only, and JSON's own types (no `true` taken as 1,
# no "5" taken as 5).
INPUT = ConfigDict(extra="forbid", strict=True)


# The live feeds' events (/api/runs/{id}/events, /api/experiments/{id}/events): each SSE
# `data` line is one JSON object with a `type`. Every type but those of FEED_OWN_EVENTS (about
# the feed, not a run) carries the common fields; these are the others each type may carry.
FEED_COMMON_FIELDS = {
    "type": "the kind of event, below",
    "run_id": "the run it is about",
    "time": "when it was sent (seconds since the epoch; a feed rebuilt from the database "
            "gives when it was recorded)",
    "step": "the run's step then",
    "total_steps": "its number of iterations",
}
FEED_EVENTS: dict[str, tuple[str, dict[str, str]]] = {
    "status": ("The run changed state outside its training: taken by a worker, queued "
               "again, lost.", {
                   "status": "queued, running, lost, ...",
                   "worker": "the worker that took it (running only)",
                   "device": "what it trains on, such as cpu or cuda:0 (running only)",
                   "attempt": "how many times a worker has taken it (running only)"}),
    "started": ("Training began, or resumed from a checkpoint.", {
        "resumed_from_step": "the checkpoint's step, or null for a fresh start",
        "checkpoint_unreadable": "why a saved state could not be used, so the run started "
                                 "over (only then)",
        "loader_processes": "how many processes build its batches beside the training "
                            "process (the setting num_workers, or what -1 chose)"}),
    "progress": ("Means since the last progress event.", {
        "losses": "loss terms by name: ce; pgc_labeled and pgc_unlabeled (Self-Tuning); "
                  "fixmatch (FixMatch)",
        "lr": "the learning rate of the backbone",
        "images_per_s": "training throughput",
        "mask_rate": "share of unlabeled images above the FixMatch threshold (FixMatch)"}),
    "eval": ("Scores on the test images.", {
        "test_top1": "top-1 accuracy (0 to 1)",
        "test_mean_class_acc": "mean per-class accuracy",
        "pseudo_label_acc": "accuracy of the pseudo-labels on hidden-label images since "
                            "the last eval (null without hidden labels)",
        "queue_purity": "share of queued keys whose class is the model's current "
                        "prediction for their image (Self-Tuning)",
        "queue_purity_truth": "share of the keys queued by unlabeled images whose class is "
                              "their hidden label (Self-Tuning; null without hidden labels)",
        "fixmatch_mask_rate": "share of unlabeled images used since the last eval "
                              "(FixMatch)"}),
    "checkpoint": ("The training state at `step` is saved: a requeue resumes from here.",
                   {}),
    "stage": ("How far work outside the steps that takes a while is (a run's feed only): "
              "decoding the images before the first step, then after the last decoding the "
              "unlabeled images and labeling them for predictions.csv. Sent every 2 s and at "
              "the end of a stage that has taken that long.", {
                  "stage": "decoding or labeling",
                  "done": "images done so far",
                  "total": "images to do in this stage"}),
    "end": ("The run ended: the last event of its feed.", {
        "status": "succeeded, failed, cancelled or lost",
        "error": "why, for a run that did not succeed (else null)",
        "metrics": "final test_top1, test_mean_class_acc, pseudo_label_acc and "
                   "train_pseudo_label_acc, or null"}),
    "earlier_end": ("The end of an earlier try of a run queued again (a run's feed "
                    "replaying); the new try's events follow.", {}),
    "experiment_end": ("Every run of the experiment has ended: the last event of its "
                       "feed. Only `type` and these fields.", {
                           "experiment_id": "the experiment",
                           "runs": "each run's status, by run id"}),
    "dropped": ("Events are missing here: Redis no longer keeps some that followed the "
                "last one the client had (read from the start, resumed with "
                "`Last-Event-ID`, or reading too slowly, after a long run's oldest were "
                "trimmed: SELFTUNE_EVENT_STREAM_MAXLEN). The feed goes on with the oldest "
                "it keeps. Only `type` and these fields.", {
                    "after": "the id of the last event the client had, a string (\"0\": "
                             "none)",
                    "until": "the id of the event that follows, the oldest kept",
                    "read": "where the whole story is: the run's recorded points "
                            "(/api/runs/{id}/metrics) or the experiment's runs "
                            "(/api/experiments/{id})"}),
}
FEED_OWN_EVENTS = ("experiment_end", "dropped")
FEED_EVENTS["earlier_end"][1].update(FEED_EVENTS["end"][1])


def feed_events_description(experiment: bool) -> str:
    """The events, as the OpenAPI description of a run's or an experiment's feed's answer."""
    own = " nor ".join(f"`{kind}`" for kind in FEED_OWN_EVENTS
                       if experiment or kind != "experiment_end")
    lines = ["Server-Sent Events; each `data` is a JSON object. The stream also sends "
             "`retry: 2000` first, `: heartbeat` comment lines while nothing happens "
             "(`: live feed unavailable` while Redis does not answer), and an `id:` line "
             "with every event but `dropped`. Fields of every event "
             f"(not {own}): " + "; ".join(
                 f"`{name}`: {text}" for name, text in FEED_COMMON_FIELDS.items()) + ".", ""]
    for kind, (text, fields) in FEED_EVENTS.items():
        if kind == "experiment_end" and not experiment:
            continue
        extra = "; ".join(f"`{name}`: {about}" for name, about in fields.items())
        lines.append(f"- `{kind}`: {text}" + (f" Fields: {extra}." if extra else ""))
    return "\n".join(lines)


class ErrorOut(BaseModel):
    """What a 4xx answers: a message that says what to fix."""

    detail: str


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: body, query, path or header, then the "
                                 "field's path")
    msg: str = Field(description="what to fix")
    type: str


class FieldErrorsOut(BaseModel):
    """What a refused request body answers: one entry per field to fix."""

    detail: list[FieldError]


# A JSON body that cannot be read at all (not UTF-8, nested too deeply).
UNREADABLE_BODY_OUT = {400: {"model": ErrorOut, "description": "the body could not be read "
                             "(not UTF-8, or nested too deeply)"}}
# A CSV list answered with an ETag (app.responses.csv_download), to a client that holds it.
CSV_NOT_MODIFIED = {"description": "not modified: `If-None-Match` holds this list's ETag"}


class PerClassBudget(BaseModel):
    model_config = INPUT
    per_class: int = Field(ge=1, le=1_000_000, description="labeled images kept per class")


# The spellings of the form and the command line: "5%", "4/class", "all".
BudgetIn = float | PerClassBudget | str
PERCENT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")
QUOTED_NUMBER = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*")
BUDGET_FORMS = ("a fraction such as 0.05, \"5%\", {\"per_class\": 4}, \"4/class\" or "
                "\"all\"")


def budget_from_text(text: str) -> Budget:
    """"all", "5%" or "4/class" (a number in quotes is not taken: JSON has numbers)."""
    if text.strip().lower() == "all":
        return Budget()
    if percent := PERCENT.fullmatch(text):
        return Budget.parse(float(percent.group(1)) / 100)
    if per_class := PER_CLASS_TEXT.fullmatch(text):
        return Budget.parse({"per_class": int(per_class.group(1))})
    if (number := QUOTED_NUMBER.fullmatch(text)) and 0 < (fraction := float(number[1])) <= 1:
        # "use a fraction such as 0.05" of "0.05" read as if 0.05 were not one.
        raise BudgetError(f"budget {text[:40]!r}: a fraction is a JSON number, {fraction:g} "
                          f"without quotes (or \"{fraction * 100:g}%\")")
    raise BudgetError(f"budget {text[:40]!r}: use {BUDGET_FORMS}")


def parse_budget_values(raw: list[Any]) -> list[Budget]:
    """The budgets of a sweep, or a ValueError saying which one is wrong: out of range,
    listed twice, or reading like another (results are grouped by their label)."""
    budgets: list[Budget] = []
    for index, value in enumerate(raw):
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        try:
            budget = budget_from_text(value) if isinstance(value, str) else Budget.parse(value)
        except BudgetError as exc:
            raise ValueError(f"budgets[{index}]: {exc}") from None
        if budget in budgets:
            first = budgets.index(budget)
            if raw[first] == raw[index]:
                raise ValueError(f"budgets[{index}]: {budget.label} is listed twice")
            raise ValueError(  # 1.0 and "all", or 0.05 and "5%"
                f"budgets[{index}]: the same budget as budgets[{first}] ({budget.label})")
        if alike := next((b for b in budgets if b.label == budget.label), None):
            raise ValueError(
                f"budgets[{index}]: {budget.to_json()} and {alike.to_json()} both read "
                f"{budget.label}; give budgets that differ in their first six digits")
        budgets.append(budget)
    return budgets


class Overrides(BaseModel):
    """Values that replace the preset's; anything omitted keeps the preset value."""

    model_config = INPUT
    iterations: int | None = Field(None, ge=1, le=1_000_000)
    image_size: int | None = Field(None, ge=16, le=1024)
    batch_size: int | None = Field(None, ge=1, le=1024)
    unlabeled_batch_size: int | None = Field(
        None, ge=0, le=1024, description="0 trains without the unlabeled images (an ablation)"
    )
    lr: float | None = Field(None, gt=0, le=10)
    head_lr_ratio: float | None = Field(None, gt=0, le=1000)
    projector_lr_ratio: float | None = Field(
        None, gt=0, le=1000, description="Self-Tuning's projector lr, as a multiple of lr"
    )
    lr_milestones: list[float] | None = Field(
        None, max_length=20,
        description="fractions of the iterations after which lr is multiplied by lr_gamma",
    )
    lr_gamma: float | None = Field(None, gt=0, le=1)
    weight_decay: float | None = Field(None, ge=0, le=1)
    momentum: float | None = Field(None, ge=0, lt=1, description="SGD momentum (Nesterov)")
    queue_size: int | None = Field(None, ge=1, le=4096)
    projector_dim: int | None = Field(None, ge=2, le=8192)
    temperature: float | None = Field(None, gt=0, le=100)
    ema_momentum: float | None = Field(None, ge=0, le=1)
    pseudo_label_threshold: float | None = Field(
        None, ge=0, le=1, description="Self-Tuning: drop less confident pseudo-labels (0: keep all)"
    )
    labeled_query_view: Literal[LABELED_QUERY_VIEWS] | None = Field(
        None, description="Self-Tuning: the view of a labeled image its query encoder and "
        "cross-entropy see; strong is the authors', weak is fine-tuning's crop + flip"
    )
    fixmatch_threshold: float | None = Field(None, ge=0, le=1)
    eval_interval: int | None = Field(None, ge=1, le=1_000_000)
    checkpoint_interval: int | None = Field(None, ge=1, le=1_000_000)
    log_interval: int | None = Field(None, ge=1, le=1_000_000)
    cpu_threads: int | None = Field(
        None, ge=0, le=1024, description="torch threads on a CPU worker; 0 uses every core"
    )
    num_workers: int | None = Field(
        None, ge=-1, le=64, description="processes that build the batches beside the training "
        "process (0: it builds them itself; -1, the presets: one per core of a GPU worker less "
        "one, at most 16, and none on a CPU); the batches are the same whatever the number"
    )
    pretrained: bool | None = Field(
        None, description="false trains from random init (tests, or models without weights)"
    )


EMPTY = {
    "methods": "choose at least one method",
    "budgets": "give at least one label budget (15%, 0.15, 4/class or all)",
    "seeds": "give at least one seed",
}


def composed(value: Any) -> Any:
    """A name composed (NFC), as names of datasets and classes are: "e" + a combining accent
    is one character to a person, and counts once against the 200."""
    return unicodedata.normalize("NFC", value) if isinstance(value, str) else value


Name = Annotated[str, BeforeValidator(composed)]


def plain_text(value: str) -> str:
    """A name as typed, without the spaces around it; a ValueError for what no name holds."""
    # PostgreSQL refuses NUL in text (a 500), and none of them belongs in a name.
    if CONTROL_CHARACTERS.search(value):
        raise ValueError("must not contain control characters (NUL, tab, line breaks)")
    if LONE_SURROGATES.search(value):
        raise ValueError("must be Unicode text: it holds half of a UTF-16 surrogate pair "
                         "(an escape such as \\ud800 without its other half)")
    return value.strip()


class RenameIn(BaseModel):
    """A new name for a dataset or an experiment (`PATCH`)."""

    model_config = INPUT
    # minLength and pattern say in the schema what the validator refuses: none, or spaces.
    name: Name = Field(max_length=200, description="1 to 200 characters, spaces around it "
                       "left out", examples=["camera traps, spring"],
                       json_schema_extra={"minLength": 1, "pattern": r"\S"})

    @field_validator("name")
    @classmethod
    def named(cls, value: str) -> str:
        try:
            if not (value := plain_text(value)):
                raise ValueError("must not be empty")
        except ValueError as exc:  # said as it is, without pydantic's "Value error, "
            raise PydanticCustomError("name", "{reason}", {"reason": str(exc)}) from None
        return value


NO_BACKBONE = ("name a backbone: a timm architecture (tf_efficientnet_lite0 has its weights "
               "offline) or an earlier run's model, runs/<run id>/model.safetensors")


class ExperimentIn(BaseModel):
    model_config = INPUT
    dataset_id: int = Field(ge=1, le=MAX_ID)
    name: Name = Field("", max_length=200)
    # minLength in the schema only: `no_control_characters` says it in words a form can show.
    backbone: str = Field("tf_efficientnet_lite0", max_length=200,
                          json_schema_extra={"minLength": 1})
    # minItems in the schema only: `not_empty` says it in words a form can show.
    methods: list[MethodName] = Field(max_length=3, json_schema_extra={"minItems": 1,
                                                                       "uniqueItems": True})
    budgets: list[BudgetIn] = Field(
        max_length=20,
        description='fractions of the labeled pool (0.05, or "5%"), {"per_class": 4} (or '
                    '"4/class"), or "all"; each a different number of labels',
        json_schema_extra={"minItems": 1},
    )
    seeds: list[int] = Field([0], max_length=10, json_schema_extra={
        "minItems": 1, "uniqueItems": True,
        "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}})
    preset: Literal["quick", "paper"] = "quick"
    overrides: Overrides = Field(default_factory=Overrides)

    @field_validator("methods", "budgets", "seeds")
    @classmethod
    def not_empty(cls, values: list[Any], info: ValidationInfo) -> list[Any]:
        # In words a form can show (pydantic's: "List should have at least 1 item after
        # validation, not 0").
        if not values:
            raise PydanticCustomError("too_short", "{what}", {"what": EMPTY[info.field_name]})
        return values

    @field_validator("budgets")
    @classmethod
    def readable_budgets(cls, values: list[Any]) -> list[Any]:
        # Checked with the other fields, so a form hears of every mistake at once; what
        # depends on the dataset is checked when the experiment is created.
        try:
            parse_budget_values(values)
        except ValueError as exc:
            raise PydanticCustomError("budget", "{reason}", {"reason": str(exc)}) from None
        return values

    @field_validator("name", "backbone")
    @classmethod
    def no_control_characters(cls, value: str, info: ValidationInfo) -> str:
        value = plain_text(value)  # a name of spaces is no name: the default one is given
        if info.field_name == "backbone" and not value:
            raise PydanticCustomError("too_short", NO_BACKBONE)
        return value


class RunSummary(BaseModel):
    id: int
    experiment_id: int
    method: str
    budget: Any
    budget_label: str
    seed: int
    status: RunStatus
    step: int
    total_steps: int
    test_top1: float | None = None
    live_top1: float | None = Field(
        None, description="for a running run, the test top-1 of its latest evaluation so far "
        "(only in an experiment's answer; `test_top1` is the final one)")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_position: int | None = Field(
        None, description="for a queued run, 1 when it is the next a free worker takes (runs "
        "are taken in the order they were queued, and one queued again goes to the back)")
    error_line: str | None = Field(
        None, description="the first line of the run's `error`, at most "
        f"{ERROR_LINE_MAX} characters: why a failed or lost run ended, or why a queued one "
        "waits (the queue is down); the run's own record (`GET /api/runs/{id}`) has all of it")


EXPERIMENT_STATUS = (
    "queued (every run waits for a worker), running (a run trains), in progress (some runs "
    "ended, the rest wait for a worker), finished, finished with failures (a run failed or "
    "was lost, another succeeded), failed (runs failed or were lost, none succeeded), partly "
    "cancelled, cancelled"
)


class BudgetRow(BaseModel):
    method: str
    budget: Any
    budget_label: str
    labeled_count: int | None = Field(
        None, description="labeled images the budget keeps (the same for every seed)"
    )
    runs: int
    finished: int = Field(description="runs that succeeded with a result")
    pending: int = Field(0, description="runs queued or running")
    mean_top1: float | None
    std_top1: float | None
    best: bool = False


class LabelEstimate(BaseModel):
    """What doubling one method's labels would buy, from top-1 = intercept + slope·ln(n)
    fitted over its succeeded runs (an extrapolation; see app.estimates)."""

    method: str
    n_max: int = Field(description="labeled images at the largest budget with results")
    measured_top1: float = Field(description="mean test top-1 (0..1) of the runs at n_max")
    gain_per_doubling: float = Field(
        description="top-1 gained (0..1) per doubling of the labeled images: slope·ln 2"
    )
    gain_per_doubling_se: float | None = Field(
        description="standard error of gain_per_doubling from the regression; null with "
        "only two points"
    )
    predicted_top1_at_double: float | None = Field(
        description="top-1 expected at 2·n_max labeled images: measured_top1 + "
        "gain_per_doubling, clipped to 0..1; null when the fit does not rise "
        "(gain_per_doubling below 0.0005): it then predicts nothing"
    )
    extra_labels: int = Field(description="labels to add to reach 2·n_max (that is, n_max)")
    images_left: int | None = Field(
        None, description="training images of the dataset beyond n_max: the most labels it "
        "can still give (fewer than extra_labels means more images would be needed)")
    n_points: int = Field(description="succeeded runs in the fit (every seed is a point)")
    intercept: float = Field(description="a in top-1 = a + b·ln(n)")
    slope: float = Field(description="b in top-1 = a + b·ln(n)")


class TimeLeft(BaseModel):
    """How long until an experiment's runs still to go have trained: the runs of every
    experiment are taken in the order they were queued by the first worker free (of the
    workers that answer now), each timed by what a step of its method took in its own
    experiment's runs so far, or in like runs of other experiments."""

    seconds: float = Field(description="until the last of the runs has trained, from now; a "
                           "run that cannot be timed yet (here or ahead of them) counts as "
                           "none, so it is then at least this")
    runs: int = Field(description="the runs still to go (queued or running)")
    untimed_runs: int = Field(description="of those, the runs not timed: no run of their "
                              "method has trained yet in this experiment, nor finished in "
                              "another with the same backbone, image size and batches")
    untimed_methods: list[str] = Field(description="the methods of the untimed runs")
    ahead_runs: int = Field(0, description="runs of other experiments that workers take "
                            "before the last of these: those training and those queued "
                            "before it")
    ahead_untimed_runs: int = Field(0, description="of those, the runs not timed yet")
    workers: int = Field(1, description="the workers counted on to take them: those that "
                         "answer now, at least one, and at least as many as runs train now")


class ExperimentOut(BaseModel):
    id: int
    name: str
    dataset_id: int
    backbone: str
    methods: list[str]
    budgets: list[Any]
    seeds: list[int]
    preset: str
    overrides: dict[str, Any]
    created_at: datetime
    status: str = Field(description=EXPERIMENT_STATUS)
    runs: list[RunSummary]
    budget_table: list[BudgetRow]
    label_estimates: list[LabelEstimate] = Field(
        description="per method with results at two or more labeled counts, what doubling "
        "its largest measured budget's labels would buy (a log-linear extrapolation of the "
        "accuracy-against-budget curve); runs that did not record their labeled count are "
        "left out"
    )
    time_left: TimeLeft | None = Field(
        None, description="how long until its runs still to go have trained, after the runs "
        "of other experiments queued before them; null once every run has ended")
    warnings: list[str] = Field(
        default_factory=list,
        description="what to know before comparing its methods, such as Self-Tuning or "
        "FixMatch runs that have no unlabeled image to use (they then use labeled images only)",
    )


class ExperimentCheckOut(BaseModel):
    """What POST /api/experiments would make of a body (POST /api/experiments/check)."""

    runs: int = Field(description="the training runs it would queue (methods x budgets x "
                      "seeds)")
    backbone: str = Field(description="the backbone as it would be stored (a file as its "
                          "path)")
    warnings: list[str] = Field(description="as ExperimentOut's warnings")


class BestRunOut(BaseModel):
    """An experiment's succeeded run with the highest test top-1: the model to take from it."""
    id: int
    method: str
    budget_label: str
    seed: int
    test_top1: float


class ExperimentListItem(BaseModel):
    id: int
    name: str
    dataset_id: int
    backbone: str
    methods: list[str]
    preset: str
    created_at: datetime
    status: str = Field(description=EXPERIMENT_STATUS)
    run_counts: dict[str, int]
    best_run: BestRunOut | None = Field(description=(
        "the succeeded run with the highest test top-1 (of those tied, the first made); "
        "null until a run has succeeded"))
    time_left: TimeLeft | None = Field(None, description="as an experiment's own: how long "
                                       "until its runs still to go have trained; null once "
                                       "every run has ended")


class ArtifactOut(BaseModel):
    name: str
    size_bytes: int
    sha256: str
    url: str


CONFUSION_FORMS = (
    "the form of a finished run's confusion matrix in `metrics` (the number of test images of "
    "each true class, a row, given each predicted class, a column; classes in the dataset's "
    "order): `dense` (the default), `confusion_matrix`, every row in full, classes² numbers "
    "(50 MB of JSON at 5,000 classes); `sparse`, `confusion_sparse` instead: {`size`: the "
    "classes, `diagonal`: each class's test images predicted right, `row_totals`: each class's "
    "test images, `cells`: [[true, predicted, count], ...] for each cell off the diagonal that "
    "is not 0, by true class then predicted class}, at most a cell a test image; `none`: "
    "neither")


class RunOut(RunSummary):
    dataset_id: int
    config: dict[str, Any]
    metrics: dict[str, Any] = Field(description=(
        "the final metrics as the engine reported them (as in training.json), once the run "
        "has succeeded: test_top1, test_mean_class_acc, per_class_acc, confusion_matrix, "
        "pseudo_label_quality, ...; empty until then. The confusion matrix "
        "comes in the form `?confusion=` asks for: dense by default, `confusion_sparse` "
        "with `confusion=sparse` (a run page's way), neither with `confusion=none`"))
    worker: str | None
    device: str | None
    error: str | None
    attempts: int = Field(description="times a worker took the run since it was queued "
                          "(by its sweep, or by a person's requeue); 0 when it ended before "
                          "any worker could start it (its dataset's files missing, say)")
    heartbeat_at: datetime | None
    images_per_s: float | None
    eta_s: float | None
    silent_s: float | None = Field(None, description="seconds since a running run's worker "
                                   "last reported, once longer than three heartbeats (a worker "
                                   "that stopped; the run is queued again after "
                                   "SELFTUNE_STALE_AFTER_S)")
    cancel_requested: bool
    resumable: bool = Field(False, description="a training state is saved: run again, it "
                            "continues from there instead of from the first step")
    artifacts: list[ArtifactOut]


class ClassProbability(BaseModel):
    label: str
    probability: float


class TriedImage(BaseModel):
    index: int = Field(description="the image's place in the form, from 0")
    name: str = Field(description="its file name as sent (`image <n>` without one)")
    label: str | None = Field(description="the most likely class; null when `skipped`")
    confidence: float | None = Field(description="that class's probability")
    margin: float | None = Field(description="its lead on the runner-up, as in "
                                 "predictions.csv")
    top: list[ClassProbability] = Field(description="the `top` most likely classes, most "
                                        "likely first; empty when `skipped`")
    skipped: str | None = Field(description="why the image could not be labeled (not an "
                                "image this app reads, over the pixel limit, empty); null "
                                "when it was")


class TriedOut(BaseModel):
    run_id: int
    images: list[TriedImage] = Field(description="one for each file sent, in their order")
    seconds: float = Field(description="how long decoding and labeling took (the model's "
                           "first load from the run's export included)")


class MetricPoint(BaseModel):
    step: int
    kind: Literal["progress", "eval"]
    values: dict[str, Any]


class RunMetricsOut(BaseModel):
    run_id: int
    points: list[MetricPoint] = Field(description="in the order of their step, then of "
                                      "their recording")
    # Left out of an answer that was not asked for a page: it was always {run_id, points}.
    next: str | None = Field(None, description="only in a page (`limit` or `after` given): "
                             "the address of the next page, null on the last")
