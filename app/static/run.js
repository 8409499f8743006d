// One run's page: live curves and status while it trains, then its results and downloads.
import {
  barChart, bytes, count, duration, failure, feedPosition, fetchJSON, follow, getJSON, h, handFocus,
  isNumber, onRestored,
  pageData, pct, RERUNNABLE, setSeries, shortName, showStatus, signedOutNotice, signInAgain, stepChart, tabTitle,
  TERMINAL,
} from "/static/charts.js";
import { labelChoice, labelFigure, labelingForm, showMoreButton } from "/static/add_labels.js";
import { endNotice } from "/static/notify.js";
import { onSession } from "/static/session.js";
import { timmSnippet } from "/static/snippet.js";
import { tryModel } from "/static/try_model.js";
import { localTime } from "/static/times.js";

const META_KEYS = new Set(["type", "step", "total_steps", "run_id", "time"]);
const LABEL_NEXT_SHOWN = 24; // images to label shown at first, and at each "Show more"
const LABEL_NEXT_READ = 500; // the most the page reads of the ranking (the CSV has them all)
const POLL_MS = 5000;
const HISTORY_PAGE = 5000; // recorded points a read asks for (the API takes up to 10,000)
// A page of the record that failed is asked for again after this pause, doubled at each
// failure up to the most (as the live feed reconnects).
const HISTORY_RETRY_MS = 1000;
const HISTORY_RETRY_MAX_MS = 30000;
// The confusion matrix as the page reads it: its diagonal, row totals and the cells off the
// diagonal that are not 0, all the page shows.
// Dense, a 5,000-class run's was 50 MB of JSON, 3.8 s of the page's main thread.
const CONFUSION_FORM = "sparse";

// Curve names for the values the engine reports; anything new shows its own name.
// An evaluation's pseudo-label numbers are about the pseudo-labels training used since the
// previous evaluation, not the model's answers then (the final model's are under Scores).
const CURVE_NAMES = {
  test_top1: "top-1", test_mean_class_acc: "mean per-class", pseudo_label_acc: "training's pseudo-labels right",
  queue_purity: "queue purity", queue_purity_truth: "queue pseudo-labels right",
  fixmatch_mask_rate: "mask rate", mask_rate: "mask rate (training)",
};
const curveName = (key) => CURVE_NAMES[key] ?? key.replaceAll("_", " ");

// The confidence below which a method drops a pseudo-label in training (FixMatch always,
// Self-Tuning when set), or null when it keeps them all. The accuracy of the pseudo-labels
// during training is then measured on the kept ones only, and says so.
function keptAbove(run) {
  const threshold = run.method === "fixmatch" ? run.config.fixmatch_threshold
    : run.method === "self-tuning" ? run.config.pseudo_label_threshold : null;
  return isNumber(threshold) && threshold > 0 ? threshold : null;
}

// A failed request that may succeed when asked again: no answer at all (fetch gives no
// status), the server's trouble (5xx), or a 408 or 429 that says to come back later. Any
// other 4xx answers the same the next time (a 404: the run was deleted).
const worthRetrying = (error) => !isNumber(error.status) || error.status >= 500
  || error.status === 408 || error.status === 429;

export function runPage() {
  const { run: initial, classNames, feedFrom: pageFeedFrom } = pageData("run-data");
  const id = initial.id;
  const threshold = keptAbove(initial);
  const pseudoAccuracy = threshold === null ? curveName("pseudo_label_acc")
    : `${curveName("pseudo_label_acc")} (kept: confidence ≥ ${threshold})`;
  let run = initial;
  let poller = null;
  let feed = null;
  // Where the feed is followed from: the page's first, after the last event before the page
  // read the run (the record holds what came before: loadHistory reads its points); one
  // followed again, after the last event of the one before, or of the run's before a requeue
  // (its answer says). With none in Redis, the feed tells it all.
  let feedFrom = pageFeedFrom ?? "";
  let deleted = false;
  // Signed out (in another tab, or a read was refused): nothing is followed until a sign-in,
  // which the page hears of from the tab that signs in.
  let signedOut = false;

  // A desktop notification when the run ends, where asked for (notify.js).
  const notice = endNotice(document.getElementById("notify-end"),
    document.getElementById("notify-note"), `notify-run-${id}`);
  let going = !TERMINAL.has(initial.status);
  function noticeEnd() {
    const now = !TERMINAL.has(run.status);
    notice.update(now);
    if (going && !now) {
      const score = isNumber(run.metrics?.test_top1) ? `: test top-1 ${pct(run.metrics.test_top1)}` : "";
      const text = (where) => document.getElementById(where).textContent.replace(/\s+/g, " ").trim();
      notice.ended(`Run #${id} ${run.status}${score}`, `${text("method")}, ${text("budget")}, seed ${run.seed}`);
    }
    going = now;
  }

  // --- live curves: one point per (kind, step), whichever way it arrived -------------------
  const points = { progress: new Map(), eval: new Map() };
  const charts = {
    losses: stepChart(document.getElementById("chart-losses"), { yTitle: "loss", extreme: "lowest" }),
    lr: stepChart(document.getElementById("chart-lr"), { yTitle: "learning rate", yType: "logarithmic" }),
    accuracy: stepChart(document.getElementById("chart-accuracy"), { percent: true, yTitle: "test set", extreme: "highest" }),
    pseudo: stepChart(document.getElementById("chart-pseudo"), { percent: true, yTitle: "share", extreme: "highest" }),
  };

  // The mean speed over the logged steps: the images over the time they took. A point's
  // images_per_s is that of the steps since the point before it, so each counts for that
  // many steps' time (the plain mean of the speeds weighed a fast stretch above its time:
  // 24.5 for a run that trained at 21.4 images/s; one weight a point was off where the last
  // stretch is shorter: 83.4 for 82.6). Worked out again only once points have changed, and
  // only for an ended run: each event redoing it made opening a long run's page quadratic
  // (20,000 replayed events over 100,000 points froze the tab for most of a minute).
  const timed = (values) => isNumber(values?.images_per_s) && values.images_per_s > 0;
  const speed = { version: 0, of: -1, mean: null };
  function meanSpeed() {
    if (speed.of !== speed.version) {
      let steps = 0;
      let seconds = 0;
      let before = 0;
      for (const [step, values] of [...points.progress.entries()].sort((a, b) => a[0] - b[0])) {
        if (timed(values) && step > before) {
          steps += step - before;
          seconds += (step - before) / values.images_per_s;
        }
        before = step;
      }
      speed.of = speed.version;
      speed.mean = seconds > 0 ? steps / seconds : null;
    }
    return speed.mean;
  }
  function addPoint(kind, step, values) {
    if (!points[kind] || !isNumber(step)) return;
    if (kind === "progress") speed.version += 1;
    points[kind].set(step, values);
    if (step >= run.step && isNumber(values.images_per_s)) run.images_per_s = values.images_per_s;
    run.step = Math.max(run.step, step);
    drawSoon();
  }

  // Tolerant of the engine's field names: every loss term it reports gets a line, every
  // `test_*` value goes to the accuracy chart and every other eval share to pseudo-labels.
  function seriesOf() {
    const series = { losses: new Map(), lr: new Map(), accuracy: new Map(), pseudo: new Map() };
    const push = (chart, name, x, y) => {
      if (!isNumber(y)) return;
      if (!series[chart].has(name)) series[chart].set(name, []);
      series[chart].get(name).push({ x, y });
    };
    const byStep = (map) => [...map.entries()].sort((a, b) => a[0] - b[0]);
    for (const [step, values] of byStep(points.progress)) {
      for (const [name, value] of Object.entries(values.losses ?? {})) push("losses", name, step, value);
      if (isNumber(values.lr)) push("lr", "learning rate", step, values.lr);
      else for (const [name, value] of Object.entries(values.lr ?? {})) push("lr", name, step, value);
      if (isNumber(values.mask_rate)) push("pseudo", curveName("mask_rate"), step, values.mask_rate);
    }
    for (const [step, values] of byStep(points.eval)) {
      for (const [name, value] of Object.entries(values)) {
        // FixMatch's mask rate since the last evaluation: the progress points' mask rate
        // already draws it, step by step.
        if (name === "fixmatch_mask_rate") continue;
        const curve = name === "pseudo_label_acc" ? pseudoAccuracy : curveName(name);
        push(name.startsWith("test_") ? "accuracy" : "pseudo", curve, step, value);
      }
    }
    return series;
  }

  // One redraw per frame at most, and no more often than twice the time the last one took
  // (a long run's charts hold 100,000 points a line): events arriving meanwhile are drawn
  // together, instead of every event (a replay of 20,000) costing a full redraw.
  let drawPending = false;
  let nextDraw = 0;
  function drawSoon() {
    if (drawPending) return;
    drawPending = true;
    const frame = () => {
      if (performance.now() < nextDraw) { requestAnimationFrame(frame); return; }
      drawPending = false;
      const started = performance.now();
      drawStatus();
      const series = seriesOf();
      for (const [name, chart] of Object.entries(charts)) {
        setSeries(chart, series[name], run.total_steps);
      }
      nextDraw = performance.now() + 2 * (performance.now() - started);
    };
    requestAnimationFrame(frame);
  }

  // The record a page at a time, each drawn as it arrives (drawSoon paces the redraws): in one
  // answer a paper-length run's 110,000 points were 23 MB, and the curves waited for all of
  // them. A point recorded while the pages are read comes in a later page.
  // A read after the first starts at the step of the last point read (`after=<step>:0`, that
  // step's points again): the record comes in step order and a run records its new points at
  // that step or later (a run run again rewrites the steps it repeats, which its feed brings
  // as they come; a page that lost those events too keeps their earlier values). A resync or
  // a `dropped` event read the whole record again from its first page (a paper-length run's
  // 22, 23 MB, at each reconnect) for the few points new.
  // One read at a time: a read asked for while one runs (a `dropped` event, a resync) joins
  // it. Its pages asked for after that hold every point recorded until then; only the one on
  // its way may have been read before, and if it was the last the read goes on from its last
  // step. Side by side, each read asked for every page (a paper-length run's 22, twice).
  // A page that fails with no answer or the server's trouble (the app restarting behind its
  // proxy) is asked for again after a pause, at once if a read is asked for meanwhile (a
  // resync: the server answers again). The read ended at the first failure, and the reads
  // that had joined it with it: the curves lacked every page after, and nothing asked again.
  let recordStep = null; // the step of the last point read from the record
  const recordAddress = () => `/api/runs/${id}/metrics?limit=${HISTORY_PAGE}`
    + (recordStep === null ? "" : `&after=${recordStep}:0`);
  let historyRead = null; // the read going on, its promise
  let historyAsked = false; // asked for while the page on its way was read
  let retryNow = () => {}; // ends the pause before a failed page is asked for again
  let historyOwed = false; // refused for a sign-in: read once signed in again (onSession)
  function loadHistory() {
    if (historyRead) {
      historyAsked = true;
      retryNow();
    } else historyRead = readHistory();
    return historyRead;
  }

  async function readHistory() {
    let address = recordAddress();
    let pause = HISTORY_RETRY_MS;
    try {
      while (address) {
        historyAsked = false;
        let page;
        try {
          page = await getJSON(address);
        } catch (error) {
          if (error.status === 401) {
            historyOwed = true;
            stopForSignIn(signInAgain());
          }
          if (!worthRetrying(error) || deleted) throw error;
          console.warn(`could not read the recorded curves (${error.message}): asking again`);
          await new Promise((resolve) => {
            const timer = setTimeout(resolve, pause);
            retryNow = () => { clearTimeout(timer); resolve(); };
          });
          retryNow = () => {};
          pause = Math.min(pause * 2, HISTORY_RETRY_MAX_MS);
          continue; // the same page, which also holds what was recorded meanwhile
        }
        pause = HISTORY_RETRY_MS;
        for (const point of page.points) addPoint(point.kind, point.step, point.values);
        if (page.points.length) recordStep = page.points.at(-1).step;
        address = page.next ?? (historyAsked ? recordAddress() : null);
      }
    } finally {
      historyRead = null; // in the step that ends the read: an ask after it starts a new one
    }
  }

  // --- status, ETA, queue position, cancel --------------------------------------------------
  // The cancel asked and not yet answered: the button says "Cancelling…" and asks nothing more.
  let cancelling = false;
  // The same for Run again ("Queuing…"): a double click asked twice, and the second ask, refused
  // as the first had queued the run, was said as a failure ("Could not run it again").
  let requeueing = false;
  function drawStatus() {
    const focused = document.activeElement;
    noticeEnd();
    showStatus(document.getElementById("run-status"), run.status);
    document.getElementById("step").textContent = `${count(run.step)} / ${count(run.total_steps)}`;
    document.getElementById("step-bar").value = run.total_steps ? run.step / run.total_steps : 0;
    // After the last step the run still evaluates, predicts every unlabeled image and exports.
    const finishing = run.status === "running" && run.total_steps && run.step >= run.total_steps;
    const working = run.status === "running" && stage !== null ? stageText() : null;
    // A worker that died leaves its run "running" until the server gives up on it.
    const silent = run.status === "running" && isNumber(run.silent_s);
    document.getElementById("eta").textContent = silent
      ? `no word from its worker for ${duration(run.silent_s)}: it may have stopped (the run `
        + (run.cancel_requested ? "ends cancelled" : "is queued again") + " if the silence lasts)"
      : finishing ? `finishing: ${working ?? "final evaluation and export"} (past cancelling: it ends when it is done)`
      : working ? `before the first step: ${working}`
      : run.status === "running" ? duration(run.eta_s) : "–";
    document.getElementById("eta-row").hidden = TERMINAL.has(run.status);
    document.getElementById("curves").classList.toggle("ended", TERMINAL.has(run.status));
    drawSpeed();
    drawTimes();
    const queued = run.status === "queued";
    document.getElementById("queue-row").hidden = !queued;
    document.getElementById("queue-position").textContent = queued && run.queue_position
      ? `${run.queue_position} (runs are taken in the order they were queued)` : "–";
    // A queued run that trained before (handed back by a stopping worker, or lost) waits for
    // any free worker: where it ran last is history, not where it runs.
    const where = run.device ? `${run.device} on ${run.worker}` : null;
    document.getElementById("device").textContent = !where ? "–"
      : queued ? `– (last ran on ${where})`
      : `${where}${run.attempts > 1 ? `, attempt ${run.attempts}` : ""}`;
    const cancel = document.getElementById("cancel");
    // Past its last step a run is not stopped (the server refuses): it scores and exports.
    cancel.hidden = TERMINAL.has(run.status) || finishing;
    // Off once pressed, but aria-disabled rather than disabled, so that it keeps the keyboard
    // until the run has ended (then Run again, in its place, takes it): disabled, it sent the
    // keyboard to the heading before the server had answered, and left it there when the
    // answer was a refusal.
    const off = cancelling || run.cancel_requested;
    cancel.setAttribute("aria-disabled", off);
    cancel.textContent = off ? "Cancelling…" : "Cancel run";
    const again = RERUNNABLE.has(run.status);
    const requeue = document.getElementById("requeue");
    requeue.hidden = !again;
    requeue.setAttribute("aria-disabled", requeueing);
    requeue.textContent = requeueing ? "Queuing…" : "Run again";
    const note = document.getElementById("requeue-note");
    note.hidden = !again;
    // A run stopped before its first saved training state has nothing to resume from.
    note.textContent = run.resumable ? "resumes from its last checkpoint" : "starts from the beginning";
    handFocus(focused, cancel, [requeue]);
    handFocus(focused, requeue, [cancel]);
    const error = document.getElementById("run-error");
    error.hidden = !run.error;
    error.textContent = run.error ?? "";
    // The tab says how the run stands: "queued", its share of steps done, "finishing", how it ended.
    tabTitle({ state: run.status !== "running" ? run.status : finishing ? "finishing"
      : run.total_steps ? `${Math.floor((100 * run.step) / run.total_steps)}%` : "running" });
  }

  // While training, the speed of the last steps; once the run has ended, the mean over its
  // logged steps (the last value says little about the run as a whole).
  function drawSpeed() {
    const node = document.getElementById("images-per-s");
    const mean = TERMINAL.has(run.status) ? meanSpeed() : null;
    if (mean !== null) {
      node.textContent = `${mean.toFixed(1)} on average while training`;
    } else if (run.status === "queued") { // queued again: its last attempt's speed is history
      node.textContent = isNumber(run.images_per_s) ? `– (${run.images_per_s.toFixed(1)} on its last attempt)` : "–";
    } else if (isNumber(run.images_per_s)) {
      node.textContent = run.images_per_s.toFixed(1);
    }
  }

  // When it first started and when it ended; the UTC time is in the tooltip.
  function drawTimes() {
    const show = (name, iso, text) => {
      document.getElementById(`${name}-row`).hidden = !iso;
      const cell = document.getElementById(name);
      cell.textContent = iso ? text : "";
      cell.title = iso ? `${iso.replace("T", " ").slice(0, 19)} UTC` : "";
    };
    show("started", run.started_at, localTime(run.started_at));
    const ended = TERMINAL.has(run.status) ? run.finished_at : null;
    let took = "";
    if (ended && run.started_at) {
      const seconds = (new Date(ended) - new Date(run.started_at)) / 1000;
      const attempts = run.attempts > 1 ? `, over ${run.attempts} attempts` : "";
      took = ` (${duration(seconds)} after it started${attempts})`;
    }
    show("ended", ended, `${localTime(ended)}${took}`);
  }

  // How many times the feed has told of a new status or an end. The record is written before
  // the live event is sent, so a read asked for after an event is never behind it; one asked
  // for before may be (the cancel's answer, sent while the run still ran, can arrive after
  // the feed said it ended, and would show it running again with nothing left to correct
  // it): such an answer gives way to a read asked after.
  let statusNews = 0;

  async function refreshRun() {
    try {
      const asked = statusNews;
      const fresh = await getJSON(`/api/runs/${id}?confusion=${CONFUSION_FORM}`);
      if (asked !== statusNews) {
        await refreshRun();
        return;
      }
      run = fresh;
      drawStatus();
      if (TERMINAL.has(run.status)) finished();
    } catch (error) {
      if (error.status === 404) gone();
      else if (error.status === 401) stopForSignIn(signInAgain());
      else console.warn("run refresh failed:", error.message);
    }
  }

  function stopForSignIn(message) {
    if (deleted || signedOut) return; // the first word on it stays
    signedOut = true;
    clearInterval(poller);
    poller = null;
    if (feed) feed.stop();
    feed = null;
    document.getElementById("cancel-error").replaceChildren(...message);
  }

  onSession({
    signedOut: () => {
      if (feed || poller) stopForSignIn(signedOutNotice("this run"));
    },
    signedIn: async () => {
      if (!signedOut) return;
      signedOut = false;
      const error = document.getElementById("cancel-error");
      if (error.querySelector(".sign-in-again")) error.replaceChildren();
      if (historyOwed) {
        historyOwed = false;
        loadHistory().catch(() => {});
      }
      await refreshRun();
      if (!TERMINAL.has(run.status)) watch();
    },
  });

  // Deleted elsewhere (with its experiment): stop following it and say so.
  function gone() {
    deleted = true;
    clearInterval(poller);
    poller = null;
    if (feed) feed.stop();
    feed = null;
    for (const name of ["cancel", "requeue", "requeue-note", "eta-row", "results"]) {
      document.getElementById(name).hidden = true;
    }
    showStatus(document.getElementById("run-status"), "deleted");
    tabTitle({ state: "deleted" });
    const error = document.getElementById("run-error");
    error.hidden = false;
    error.textContent = `Run #${id} no longer exists: its experiment was deleted.`;
  }

  document.getElementById("cancel").addEventListener("click", async () => {
    if (cancelling || run.cancel_requested) return;
    if (!window.confirm(`Cancel run #${id}? Its training stops within about one iteration.`)) return;
    document.getElementById("cancel-error").textContent = "";
    cancelling = true;
    drawStatus();
    try {
      const asked = statusNews;
      const answer = await getJSON(`/api/runs/${id}/cancel`, { method: "POST" });
      cancelling = false;
      if (asked !== statusNews) {
        await refreshRun();
        return;
      }
      run = answer;
      drawStatus();
    } catch (error) {
      // The button comes back as the page knows the run; the read corrects it if it can.
      cancelling = false;
      drawStatus();
      document.getElementById("cancel-error").replaceChildren(...failure("Could not cancel", error));
      await refreshRun();
    }
  });

  document.getElementById("requeue").addEventListener("click", async () => {
    if (requeueing) return;
    document.getElementById("cancel-error").textContent = "";
    requeueing = true;
    drawStatus();
    try {
      const { body, headers } = await fetchJSON(`/api/runs/${id}/requeue`, { method: "POST" });
      run = body;
      feedFrom = feedPosition(headers) || feedFrom;
    } catch (error) {
      requeueing = false;
      drawStatus();
      document.getElementById("cancel-error").replaceChildren(...failure("Could not run it again", error));
      await refreshRun();
      return;
    }
    requeueing = false;
    drawStatus();
    document.getElementById("results").hidden = true;
    finishedDrawn = false;
    watch();
  });

  // --- after the end ------------------------------------------------------------------------
  let finishedDrawn = false;
  function finished() {
    if (finishedDrawn) return;
    finishedDrawn = true;
    clearInterval(poller);
    poller = null;
    if (feed) {
      // Ended while its feed rested in a hidden tab, or reconnected (the poller saw the
      // end): the points since are in the record. The curves stopped where the feed had.
      if (!feed.live()) loadHistory().catch(() => {});
      feedFrom = feed.lastId() || feedFrom;
      feed.stop();
    }
    feed = null;
    drawSoon();
    if (run.status !== "succeeded") return;
    const results = document.getElementById("results");
    results.hidden = false;
    drawResults(run, classNames);
    drawMistakes(run);
    drawLabelNext(run, classNames);
    drawDownloads(run, classNames);
    tryModel(run);
  }

  // The last `stage` event of the work outside the steps (decoding the images before the
  // first, labeling the unlabeled ones after the last), with its pace from the one before;
  // null once the steps go on or the run ends.
  let stage = null;
  function followStage(event) {
    if (event.type === "stage") {
      const before = stage?.stage === event.stage ? stage : null;
      const pace = before && event.time > before.time
        ? (event.done - before.done) / (event.time - before.time) : null;
      stage = { ...event, pace: pace > 0 ? pace : before?.pace ?? null };
    } else if (["started", "progress", "status", "end"].includes(event.type)) stage = null;
  }
  function stageText() {
    const what = stage.stage === "labeling" ? "labeling the unlabeled images" : "decoding the images";
    const left = stage.pace ? `, about ${duration((stage.total - stage.done) / stage.pace)} left` : "";
    return `${what}, ${count(stage.done)} of ${count(stage.total)}${left}`;
  }

  function onEvent(event) {
    followStage(event);
    // Events Redis no longer kept are missing from the feed: the record has every point. Read
    // on from where the page has it, also for a feed read from the start (after 0): a page
    // opened in a background tab opens its feed only when shown, long after its first read.
    if (event.type === "dropped") loadHistory().catch(() => {});
    if (event.type === "progress" || event.type === "eval") {
      const values = Object.fromEntries(Object.entries(event).filter(([k]) => !META_KEYS.has(k)));
      addPoint(event.type, event.step, values);
    }
    const before = run.status;
    // A resumed attempt starts at its checkpoint's step (the first at 0), perhaps before
    // what the page has: it re-does the steps since (the record keeps their first points).
    if (isNumber(event.step)) run.step = event.type === "started" ? event.step : Math.max(run.step, event.step);
    if (event.type === "status" && event.status) run.status = event.status;
    if (["started", "progress", "eval"].includes(event.type) && run.status === "queued") run.status = "running";
    if (run.status !== before || event.type === "end") statusNews += 1;
    drawSoon(); // the status with the curves, once a frame: not once per replayed event
    // The record says whether the run is over (the feed sends an earlier try's end as
    // `earlier_end`, but a run may be requeued the moment it ends); refreshRun() stops the
    // feed when it is.
    if (event.type === "end") refreshRun();
  }

  // Follow the run live until it ends (again, after a requeue).
  function watch() {
    if (feed || deleted || signedOut) return;
    // Queue position and ETA are not in the event feed; the API computes them.
    poller = setInterval(refreshRun, POLL_MS);
    const liveState = document.getElementById("live-state");
    feed = follow(`/api/runs/${id}/events`, {
      after: feedFrom,
      onEvent,
      onResync: () => { loadHistory().catch(() => {}); refreshRun(); },
      onClosed: refreshRun, // a refused feed (an expired sign-in) is said there, and stopped
      onState: (state) => {
        liveState.textContent = state === "live" ? "● live" : state === "ended" ? "" : "reconnecting…";
      },
    });
  }

  // The page's own data is the run without its metrics (app/routers/experiment_pages.py): a
  // finished run's results, with their per-class lists, come from this read, which the
  // browser starts as the page loads (run.html preloads it) and the page paints meanwhile.
  async function readResults() {
    try {
      run = await getJSON(`/api/runs/${id}?confusion=${CONFUSION_FORM}`);
    } catch (error) {
      if (error.status === 404) gone();
      else if (error.status === 401) stopForSignIn(signInAgain());
      else {
        document.getElementById("cancel-error").replaceChildren(
          ...failure("Could not read the run's results", error), " (reload the page to try again)");
      }
      return;
    }
    drawStatus();
    if (TERMINAL.has(run.status)) finished();
    else watch(); // run again since the page was served
  }

  // Run again from elsewhere (its experiment page, another tab, the API) while this page
  // showed it ended: the page kept "cancelled" and its Run again button until reloaded. An
  // ended run's page asks again when its tab is shown or its window comes to the front, and
  // follows the run anew when it is queued or running again.
  async function askWhetherRunAgain() {
    if (!finishedDrawn || deleted || signedOut || requeueing || document.hidden) return;
    await refreshRun();
    if (TERMINAL.has(run.status) || deleted || signedOut) return;
    document.getElementById("results").hidden = true;
    finishedDrawn = false;
    watch();
  }
  document.addEventListener("visibilitychange", askWhetherRunAgain);
  window.addEventListener("focus", askWhetherRunAgain);

  // Deleted (with its experiment) while the page was kept, it says so (refreshRun: gone());
  // still there, it shows the run as it is now.
  onRestored(async () => {
    if (deleted || signedOut) return;
    await refreshRun();
    if (!TERMINAL.has(run.status)) watch();
  });

  drawStatus();
  loadHistory().catch((error) => console.warn("could not load the recorded curves:", error.message));
  if (run.status === "succeeded") readResults();
  else if (TERMINAL.has(run.status)) finished();
  else watch();
}

// --- results of a finished run ----------------------------------------------------------------

function drawResults(run, classNames) {
  const m = run.metrics;
  const q = m.pseudo_label_quality ?? {};
  const threshold = keptAbove(run);
  // A pseudo-label accuracy needs images whose labels the budget withheld, and during
  // training, with a threshold, pseudo-labels that reached it.
  const noWithheld = !isNumber(m.pseudo_label_acc);
  const withheld = (value, why = "no image with a withheld label") =>
    (isNumber(value) ? pct(value) : `– (${why})`);
  const headline = [
    ["Test top-1", pct(m.test_top1)],
    ["Mean per-class accuracy", pct(m.test_mean_class_acc)],
    ["Pseudo-label accuracy (final model, withheld labels)", withheld(m.pseudo_label_acc)],
  ];
  // Fine-tuning trains on the labeled images only: it has no pseudo-labels in training.
  if (run.method !== "fine-tune") {
    headline.push([threshold === null ? "Pseudo-label accuracy during training"
      : `Pseudo-label accuracy during training, of the kept pseudo-labels (confidence ≥ ${threshold})`,
    withheld(m.train_pseudo_label_acc, noWithheld ? undefined
      : threshold !== null ? `none reached confidence ${threshold}`
      : "no unlabeled image in training")]);
  }
  if (isNumber(m.fixmatch_mask_rate)) headline.push(["FixMatch mask rate", pct(m.fixmatch_mask_rate)]);
  document.getElementById("headline").replaceChildren(
    ...headline.map(([name, value]) => h("tr", {}, h("th", {}, name), h("td", { class: "num" }, value))));

  // A run without a matrix (none recorded) shows no class.
  const confusion = m.confusion_sparse ?? { size: 0, diagonal: [], row_totals: [], cells: [] };
  const names = classNames.length === confusion.size ? classNames
    : Array.from({ length: confusion.size }, (_, i) => `class ${i}`);
  drawConfusion(confusion, names);
  drawPerClass(m.per_class_acc ?? [], confusion.row_totals, names, q);
  drawQuality(q, names);
}

// Over this many classes a matrix is no longer read (1,000 classes: a million cells, a
// minute to draw): the page lists the most frequent confusions instead.
const MATRIX_CLASSES = 30;
const CONFUSIONS_LISTED = 25;

function drawConfusion(confusion, names) {
  const title = document.getElementById("confusion-title");
  if (names.length > MATRIX_CLASSES) {
    title.textContent = `Most frequent confusions (${count(names.length)} classes: the full matrix is in the API and training.json)`;
    drawConfusions(confusion, names);
    return;
  }
  const head = h("tr", {}, h("th", {}, "true ↓ / predicted →"), names.map(columnName));
  const body = denseRows(confusion).map((row, i) => {
    const total = confusion.row_totals[i];
    return h("tr", {}, h("th", { class: "name" }, names[i]), row.map((count, j) => {
      const share = total ? count / total : 0;
      // Row-normalised colour: the diagonal reads as per-class recall.
      return h("td", {
        class: `num cm${i === j ? " diagonal" : ""}`,
        style: { background: `rgba(47, 111, 222, ${(share * 0.9).toFixed(3)})`, color: share > 0.55 ? "#fff" : "" },
        title: `true ${names[i]}, predicted ${names[j]}: ${count} of ${total} (${pct(share)})`,
      }, i !== j && count ? mistakesLink(names[i], names[j], count) : count);
    }));
  });
  document.getElementById("confusion").replaceChildren(h("thead", {}, head), h("tbody", {}, body));
}

// Every cell of a sparse matrix (`?confusion=sparse`), row by row.
function denseRows({ size, diagonal, cells }) {
  const rows = Array.from({ length: size }, (_, i) => Array.from({ length: size }, (_, j) => (i === j ? diagonal[i] : 0)));
  for (const [i, j, count] of cells) rows[i][j] = count;
  return rows;
}

// A column of the matrix is named as the charts name classes, cut short (whole names left
// one column on screen); the tooltip and screen readers have the whole name.
function columnName(name) {
  const short = shortName(name);
  if (short === name) return h("th", { class: "num" }, name);
  return h("th", { class: "num", title: name },
    h("span", { "aria-hidden": "true" }, short), h("span", { class: "sr-only" }, name));
}

// The largest off-diagonal cells: which class is taken for which, most often first. At many
// classes and few test images a class, most counts tie (1,000 classes of 5 test images: nearly
// all are 1 or 2), so ties go to what says more: the larger share of the true class's test
// images (2 of 4 before 2 of 10), then a pair also confused the other way round (two classes
// the model cannot tell apart, not one stray answer), then the classes' names (class order is
// the names' natural order).
function drawConfusions({ size, row_totals: totals, cells: sparse }, names) {
  const counts = new Map(sparse.map(([i, j, count]) => [i * size + j, count]));
  const cells = sparse.map(([i, j, count]) => ({ i, j, count, total: totals[i], back: counts.get(j * size + i) ?? 0 }));
  // Shares compared as cross products: the same fraction of different totals ties exactly.
  cells.sort((a, b) => b.count - a.count || b.count * a.total - a.count * b.total
    || b.back - a.back || a.i - b.i || a.j - b.j);
  const head = h("tr", {}, h("th", {}, "True class"), h("th", {}, "Predicted as"),
    h("th", { class: "num" }, "Test images"), h("th", { class: "num" }, "Share of the class"));
  const listed = cells.slice(0, CONFUSIONS_LISTED);
  const body = listed.map(({ i, j, count, total }) => h("tr", {},
    h("td", { class: "name" }, names[i]), h("td", { class: "name" }, names[j]),
    h("td", { class: "num" }, mistakesLink(names[i], names[j], count)),
    h("td", { class: "num" }, pct(count / total))));
  const table = document.getElementById("confusion");
  table.classList.remove("confusion");
  table.replaceChildren(h("thead", {}, head), h("tbody", {},
    body.length ? body : h("tr", {}, h("td", { colspan: 4 }, "None: every test image was classified right."))));
  const note = document.getElementById("confusion-note");
  note.hidden = cells.length === 0;
  if (!cells.length) return;
  // Where the list ends inside a tie, the ones left out are as frequent as the last listed.
  const last = listed.at(-1).count;
  const alike = cells.slice(listed.length).filter((cell) => cell.count === last).length;
  note.textContent = `${listed.length === cells.length ? `All ${count(cells.length)}`
    : `The ${listed.length} most frequent of ${count(cells.length)}`} confusions (a pair of a true `
    + "class and the class predicted for it). Equally frequent ones are ordered by the share of "
    + "the true class's test images, then pairs also confused the other way round first, then "
    + "by class name."
    + (alike ? ` ${count(alike)} more, not listed, have ${last} test image${last === 1 ? "" : "s"} too.` : "");
}

// Over this many classes a table or chart of every class in class order is searched rather
// than read: the per-class table opens worst first and the distribution chart draws the
// classes whose predicted share strays most from their labeled one.
const MANY_CLASSES = 20;
// The per-class rows drawn until the user asks for every class: at 5,000 classes the whole
// table is 40,000 elements, which took 1.7 s to draw in headless Chromium; a sort of 50 rows
// takes tens of milliseconds.
const PER_CLASS_SHOWN = 50;
// Every row, asked for, came in one task: at 5,000 classes 0.7-1.7 s with the tab frozen,
// most of it the table's layout (building the rows is a tenth of it, however they are built).
// Past FIRST_ROWS the rows come over frames, FIRST_ROWS at once, then each frame half as many
// again as the last, up to ROWS_A_FRAME: the first rows show in the next frame, the longest
// frame is about a third as long, and a sort or a key in the find box waits for one frame,
// not for every row. In all the rows take as long or somewhat longer (bench/run_classes.py);
// batches of one small size took two to three times as long (250 a frame: 2-3 s).
const FIRST_ROWS = 200;
const ROWS_A_FRAME = 1000;
const DISTRIBUTION_SHOWN = 20;
// The per-class note is a live region: typed into the find box, it is rewritten once typing
// pauses this long, not at each letter (a screen reader spoke after every one, "…holds “s”",
// "…holds “sp”", …). The rows follow every letter at once.
const NOTE_PAUSE_MS = 700;

// How each column of the per-class table sorts and reads in the note; rows without a value
// (no test image of the class, a class never pseudo-labeled) go last either way, and rows
// that tie stay in class order.
const ORDERS = {
  class: { up: "in class order", down: "in reverse class order" },
  accuracy: { up: "by test accuracy, lowest first", down: "by test accuracy, highest first" },
  images: { up: "by test images, fewest first", down: "by test images, most first" },
  precision: { up: "by pseudo-label precision, lowest first", down: "by pseudo-label precision, highest first" },
  recall: { up: "by pseudo-label recall, lowest first", down: "by pseudo-label recall, highest first" },
};

// Per-class accuracy, sortable by every column. Over MANY_CLASSES classes it opens on the
// lowest accuracy first (the classes that fail are what a long table is read for), and over
// PER_CLASS_SHOWN it draws that many rows with a button for all of them and a box to find a
// class by name: sorting and filtering rebuild at most those rows, so a 5,000-class run's page
// opens and sorts as fast as a small one's, and nothing is out of reach.
function drawPerClass(perClass, totals, names, quality) {
  const precision = quality.per_class_precision;
  const recall = quality.per_class_recall;
  const withPseudo = Array.isArray(precision) && Array.isArray(recall);
  const rows = names.map((name, index) => ({
    index, name, folded: name.toLocaleLowerCase(), class: index, accuracy: perClass[index],
    images: totals[index] ?? 0,
    precision: withPseudo ? precision[index] : null, recall: withPseudo ? recall[index] : null,
  }));
  const columns = [
    { key: "class", title: "Class" },
    { key: "accuracy", title: "Test accuracy" },
    { key: "images", title: "Test images", num: true },
    ...(withPseudo ? [{ key: "precision", title: "Pseudo-label precision", num: true },
      { key: "recall", title: "recall", num: true }] : []),
  ];
  const bounded = rows.length > PER_CLASS_SHOWN;
  const state = {
    key: rows.length > MANY_CLASSES ? "accuracy" : "class", up: true, all: false, filter: "",
  };
  let sorted = rows;

  // Rows are built once, when first shown, and moved afterwards. The accuracy's bar is its
  // cell's background (app.css, td.share), not elements of its own.
  const built = new Map();
  const rowNode = (row) => {
    if (!built.has(row.index)) {
      const accuracy = h("td", { class: "share" }, pct(row.accuracy));
      accuracy.style.setProperty("--share", `${(row.accuracy ?? 0) * 100}%`);
      built.set(row.index, h("tr", {}, h("td", { class: "name" }, row.name), accuracy,
        h("td", { class: "num" }, row.images),
        withPseudo ? [h("td", { class: "num" }, pct(row.precision)), h("td", { class: "num" }, pct(row.recall))] : []));
    }
    return built.get(row.index);
  };

  const headers = columns.map((column) => {
    const mark = h("span", { class: "sort-mark", "aria-hidden": "true" });
    const button = h("button", { type: "button", class: "sort" }, column.title, mark);
    button.addEventListener("click", () => {
      state.up = state.key === column.key ? !state.up : true;
      state.key = column.key;
      sort();
      draw();
    });
    return { column, mark, th: h("th", { class: column.num ? "num" : null, scope: "col" }, button) };
  });

  function sort() {
    const { key, up } = state;
    const missing = (value) => !isNumber(value);
    sorted = rows.slice().sort((a, b) => {
      if (missing(a[key]) || missing(b[key])) return missing(a[key]) - missing(b[key]) || a.index - b.index;
      return (up ? a[key] - b[key] : b[key] - a[key]) || a.index - b.index;
    });
  }

  const table = document.getElementById("per-class");
  const tbody = h("tbody");
  const more = document.getElementById("per-class-more");
  const note = document.getElementById("per-class-note");
  const filter = document.getElementById("per-class-filter");
  // The note, now or (`typing`) once typing pauses; the same words again are left alone, as
  // a screen reader reads a live region anew when its text is replaced, the same text too.
  let noteTimer;
  function say(text, typing) {
    clearTimeout(noteTimer);
    const write = () => { if (note.textContent !== text) note.textContent = text; };
    if (typing) noteTimer = setTimeout(write, NOTE_PAUSE_MS);
    else write();
  }

  // The rows a draw still has to add, a frame at a time (see FIRST_ROWS); a new draw (a sort,
  // a key in the find box) drops them, and so does a table drawn anew (the run ran again and
  // ended again). While they come the table is aria-busy, and the note says what is shown
  // once they are all there.
  let adding = 0;
  function addRows(shown, from, batch, done) {
    if (!tbody.isConnected) return;
    const added = shown.slice(from, from + batch).map(rowNode);
    if (from === 0) tbody.replaceChildren(...added);
    else tbody.append(...added);
    if (from + batch >= shown.length) {
      table.removeAttribute("aria-busy");
      done();
      return;
    }
    const next = Math.min(Math.ceil(batch * 1.5), ROWS_A_FRAME);
    adding = requestAnimationFrame(() => addRows(shown, from + batch, next, done));
  }

  function draw({ typing = false } = {}) {
    for (const { column, mark, th } of headers) {
      const sortedHere = column.key === state.key;
      if (sortedHere) th.setAttribute("aria-sort", state.up ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
      mark.textContent = !sortedHere ? " ↕" : state.up ? " ▲" : " ▼";
    }
    const matching = state.filter ? sorted.filter((row) => row.folded.includes(state.filter)) : sorted;
    const shown = state.all ? matching : matching.slice(0, PER_CLASS_SHOWN);
    const order = ORDERS[state.key][state.up ? "up" : "down"];
    const typed = filter.value.trim();
    const tell = () => {
      if (!bounded) return;
      say(!state.filter
        ? `${shown.length === rows.length ? "All" : count(shown.length)} of ${count(rows.length)} classes, ${order}.`
        : !matching.length ? `No class name holds “${typed}”.`
        : `${shown.length === matching.length ? "All" : count(shown.length)} of the ${count(matching.length)} `
          + `class${matching.length === 1 ? "" : "es"} whose name holds “${typed}”, ${order}.`, typing);
    };
    cancelAnimationFrame(adding);
    clearTimeout(noteTimer); // a note on its way is about rows no longer drawn
    if (shown.length > FIRST_ROWS) table.setAttribute("aria-busy", "true");
    addRows(shown, 0, FIRST_ROWS, tell);
    if (!bounded) return;
    more.parentElement.hidden = matching.length <= PER_CLASS_SHOWN;
    more.textContent = state.all ? `Show the first ${PER_CLASS_SHOWN} only`
      : `Show all ${count(matching.length)} ${state.filter ? "matching " : ""}classes`;
  }

  table.replaceChildren(h("thead", {}, h("tr", {}, headers.map(({ th }) => th))), tbody);
  document.getElementById("per-class-controls").hidden = !bounded;
  note.hidden = !bounded;
  more.parentElement.hidden = !bounded;
  // Handlers set, not added: a run that is run again and ends again draws its table anew.
  filter.value = "";
  more.onclick = () => { state.all = !state.all; draw(); };
  filter.oninput = () => { state.filter = filter.value.trim().toLocaleLowerCase(); draw({ typing: true }); };
  sort();
  draw();
}

// The classes the predicted-against-labeled chart draws: every class, in class order, up to
// MANY_CLASSES; beyond, a bar pair a class is a few pixels wide and unreadable, so it draws the
// DISTRIBUTION_SHOWN classes whose predicted share differs most from their labeled share
// (those the model over- or under-predicts), the largest difference first, and says so.
function distributionShown(predicted, labeled) {
  const every = predicted.map((_, i) => i);
  const note = document.getElementById("distribution-note");
  note.hidden = every.length <= MANY_CLASSES;
  if (every.length <= MANY_CLASSES) return every;
  const gap = (i) => Math.abs((predicted[i] ?? 0) - (labeled[i] ?? 0));
  const shown = every.sort((a, b) => gap(b) - gap(a) || a - b).slice(0, DISTRIBUTION_SHOWN);
  document.getElementById("chart-distribution").setAttribute("aria-label",
    `class distributions of the ${shown.length} classes that differ most`);
  note.textContent = `The ${shown.length} of ${count(predicted.length)} classes whose share of the `
    + "predictions differs most from their share of the labeled images, largest difference first "
    + "(every class's shares are in the API, under pseudo_label_quality).";
  return shown;
}

function drawQuality(q, names) {
  // A run without unlabeled images (every label kept, none uploaded) has nothing to judge.
  const unlabeled = (q.confidence_histogram?.counts ?? []).reduce((a, b) => a + b, 0);
  document.getElementById("quality-none").hidden = unlabeled > 0;
  document.getElementById("quality-details").hidden = unlabeled === 0;
  if (unlabeled === 0) return;
  // What a 0.95 threshold keeps: how many images, and how right they are where a withheld
  // label can tell (none can under the "all" budget).
  const kept = Math.round((q.kept_share_at_095 ?? 0) * unlabeled);
  const count = (n) => n.toLocaleString("en");
  const facts = [
    ["Images a 0.95 threshold keeps", isNumber(q.kept_share_at_095)
      ? `${count(kept)} of ${count(unlabeled)} (${pct(q.kept_share_at_095)})` : "–"],
    // Of those with a withheld label only (the budget's held-back images): said with how
    // many, where the run recorded it; 20% of 10 is not 20% of 1,000.
    ["Accuracy of what it keeps", isNumber(q.kept_accuracy_at_095)
      ? pct(q.kept_accuracy_at_095) + (isNumber(q.kept_judged_at_095)
        ? ` (of the ${count(q.kept_judged_at_095)} with a withheld label)` : "")
      : kept === 0 ? "– (it keeps none)" : "– (none of them has a withheld label)"],
  ];
  if ("queue_purity" in q) { // Self-Tuning's queue of keys; the other methods have none
    facts.push(["Queue purity (agrees with the model)", pct(q.queue_purity)],
      ["Pseudo-labeled queue keys that are right (withheld labels)", pct(q.queue_purity_truth)]);
  }
  document.getElementById("quality-facts").replaceChildren(
    ...facts.map(([name, value]) => h("tr", {}, h("th", {}, name), h("td", { class: "num" }, value))));

  const bins = q.confidence_bins ?? [];
  const judged = bins.some((bin) => isNumber(bin.accuracy));
  document.getElementById("bins-note").hidden = judged;
  if (judged) {
    barChart(document.getElementById("chart-bins"),
      // The accuracy of a bin is over its images with a withheld label (older runs: all).
      bins.map((b) => `${b.lo.toFixed(1)}–${b.hi.toFixed(1)} (${b.judged ?? b.count})`),
      [{ label: "pseudo-label accuracy", data: bins.map((b) => b.accuracy) }],
      { percent: true, xTitle: "confidence (images with a withheld label)" });
  }
  if (Array.isArray(q.predicted_distribution)) {
    const labeled = q.labeled_distribution ?? [];
    const shown = distributionShown(q.predicted_distribution, labeled);
    barChart(document.getElementById("chart-distribution"), shown.map((i) => names[i] ?? `class ${i}`), [
      { label: "predicted (unlabeled)", data: shown.map((i) => q.predicted_distribution[i]) },
      { label: "labeled", data: shown.map((i) => labeled[i]) },
    ], { percent: true, fit: shown.length < q.predicted_distribution.length });
  }
  const histogram = q.confidence_histogram;
  if (histogram?.counts) {
    barChart(document.getElementById("chart-confidence"),
      histogram.counts.map((_, i) => histogram.edges[i].toFixed(2)),
      [{ label: "unlabeled images", data: histogram.counts }],
      { xTitle: "confidence of the top class" });
  }
}

// "rank,image_id,path,label,...\n" -> [{rank, image_id, ...}]; quoted fields per RFC 4180,
// since archive paths may hold commas.
function parseCsv(text) {
  const rows = [];
  let row = [];
  let field = "";
  let quoted = false;
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i += 1; } else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { row.push(field); field = ""; }
    else if (c === "\n") { row.push(field); rows.push(row); row = []; field = ""; }
    else if (c !== "\r") field += c;
  }
  if (field || row.length) { row.push(field); rows.push(row); }
  const [header = [], ...body] = rows;
  return body.map((cells) => Object.fromEntries(header.map((key, i) => [key, cells[i] ?? ""])));
}

// The test images of a true class taken for another: a count of the confusion matrix (or of
// its most frequent confusions) links to them under "Test images it got wrong".
const mistakesLink = (label, predicted, count) => h("a", {
  href: "#mistakes", class: "mistakes-link", "data-label": label, "data-predicted": predicted,
  title: `show the ${count} test image${count === 1 ? "" : "s"} of ${label} taken for ${predicted}`,
}, count);

const MISTAKES_SHOWN = 24; // test images shown at first, and at each "Show more"

// The test images the exported model got wrong (test_predictions.json: each test image's
// class and the model's answer), those of one pair of a class and an answer or of every pair,
// the most frequent pair first (each pair's in test order); each opens larger (viewer.js),
// to tell a mistake of the model from a wrong label in the test split.
async function drawMistakes(run) {
  const box = document.getElementById("mistakes-thumbs");
  const choice = document.getElementById("mistakes-choice");
  const pick = document.getElementById("mistakes-pair");
  const say = (text) => box.replaceChildren(h("p", { class: "muted" }, text));
  const tested = run.artifacts.find((a) => a.name === "test_predictions.json");
  if (!tested) return say("No test predictions recorded for this run.");
  let rows;
  try {
    rows = await getJSON(tested.url);
  } catch (error) {
    return say(`The test predictions could not be read (${error.message}).`);
  }
  const wrong = rows.filter((row) => row.label !== row.predicted);
  if (!wrong.length) {
    return say(`None: the model got each of the ${count(rows.length)} test images right.`);
  }
  const pairs = new Map(); // "label\0predicted" -> its images, in test order
  for (const row of wrong) {
    const key = `${row.label}\0${row.predicted}`;
    if (!pairs.has(key)) pairs.set(key, []);
    pairs.get(key).push(row);
  }
  const ordered = [...pairs].sort(([a, x], [b, y]) => y.length - x.length || (a < b ? -1 : 1));
  // Every mistake: those of the most frequent pair first, as the list names them.
  const every = ordered.flatMap(([, images]) => images);
  pick.replaceChildren(
    h("option", { value: "" }, `every mistake (${count(wrong.length)} of ${count(rows.length)} test images)`),
    ...ordered.map(([key, images]) => {
      const [label, predicted] = key.split("\0");
      return h("option", { value: key }, `${label} taken for ${predicted} (${count(images.length)})`);
    }));
  choice.hidden = false;

  let images = every;
  let shown = 0;
  const more = h("button", { type: "button", class: "secondary", id: "mistakes-more", "data-more": "" });
  const rest = h("p", { id: "mistakes-rest" }, more);
  const showMore = () => {
    const next = images.slice(shown, shown + MISTAKES_SHOWN);
    shown += next.length;
    rest.before(...next.map((row) => labelFigure({
      src: row.image_id ? `/api/datasets/${run.dataset_id}/images/${row.image_id}/thumbnail` : null,
      path: row.path, alt: row.path, title: `${row.path}: ${row.label}, taken for ${row.predicted}`,
    }, [h("span", { class: "label" }, row.label), h("span", { class: "label" }, `→ ${row.predicted}`)])));
    const left = images.length - shown;
    more.textContent = `Show ${Math.min(left, MISTAKES_SHOWN)} more`;
    rest.hidden = left === 0;
  };
  more.addEventListener("click", showMore);
  const show = (key) => {
    pick.value = pairs.has(key) ? key : "";
    images = pairs.get(pick.value) ?? every;
    shown = 0;
    box.querySelectorAll("figure").forEach((figure) => figure.remove());
    showMore();
  };
  pick.addEventListener("change", () => show(pick.value));
  // A count in the matrix: its pair, then the browser goes to #mistakes.
  document.getElementById("confusion").addEventListener("click", (event) => {
    const link = event.target.closest("a.mistakes-link");
    if (link) show(`${link.dataset.label}\0${link.dataset.predicted}`);
  });
  box.replaceChildren(rest);
  show("");
}

async function drawLabelNext(run, classNames) {
  const box = document.getElementById("label-next-thumbs");
  const missing = () => box.replaceChildren(h("p", { class: "muted" }, "No predictions for unlabeled images."));
  if (!run.artifacts.some((a) => a.name === "predictions.csv")) return missing();
  const ranking = (order) => `/api/runs/${run.id}/label-next.csv${order === "spread" ? "?order=spread" : ""}`;
  const read = async (order) => {
    const url = new URL(ranking(order), location.href);
    url.searchParams.set("limit", LABEL_NEXT_READ);
    const response = await fetch(url);
    if (!response.ok) throw new Error(response.statusText);
    return parseCsv(await response.text());
  };
  let rows;
  try {
    rows = await read("margin");
  } catch {
    return missing();
  }
  if (rows.length) {
    // The labels given, by image path: they stay through another order and "Show more".
    const given = new Map();
    const { form, watch } = labelingForm(run.dataset_id, given, "label-next-form");
    const order = h("select", { id: "label-next-order" },
      h("option", { value: "margin" }, "the least certain first"),
      h("option", { value: "spread" }, "the least certain of each predicted class in turn"));
    const orderRow = h("p", { id: "label-next-order-row" }, h("label", { for: "label-next-order" }, "Order: "), order);
    // LABEL_NEXT_SHOWN at first, as many more at each "Show more", each with its choice.
    let shown = 0;
    const more = showMoreButton("label-next-more", box, () => showMore());
    const rest = h("p", { class: "muted", id: "label-next-rest" });
    const showMore = () => {
      const next = rows.slice(shown, shown + LABEL_NEXT_SHOWN);
      shown += next.length;
      rest.before(...next.map((row) => {
        const choice = labelChoice(row.path, classNames, given);
        watch(choice, row.path);
        return thumbnail(run)(row, choice);
      }));
      const left = rows.length - shown;
      more.textContent = `Show ${Math.min(left, LABEL_NEXT_SHOWN)} more`;
      // Those past the first LABEL_NEXT_READ are in the CSV only.
      rest.hidden = left === 0 && rows.length < LABEL_NEXT_READ;
      rest.replaceChildren(...(left ? [more] : [`These are the first ${shown}; the rest are in `,
        h("a", { href: ranking(order.value) }, "the CSV"), "."]));
    };
    let ordered = order.value; // the order the images are shown in
    order.addEventListener("change", async () => {
      order.disabled = true;
      try {
        rows = await read(order.value);
        ordered = order.value;
      } catch {
        order.value = ordered; // kept as it was, and says so: the next change asks again
      }
      order.disabled = false;
      box.querySelectorAll("figure").forEach((figure) => figure.remove());
      shown = 0;
      showMore();
    });
    box.replaceChildren(orderRow, rest, form,
      h("p", { class: "muted", id: "add-labels-hint" }, "Labeled others? ",
        h("a", { href: `/datasets/${run.dataset_id}#add-labels-title` }, "Add their labels"),
        " to the dataset as a CSV of path,label lines."));
    showMore();
    return;
  }
  // The labels this budget withheld are the user's own: show those images ranked the same
  // way (what this run would have asked for), and say that is what they are.
  const ranked = `/api/runs/${run.id}/label-next.csv?include_withheld=true`;
  const any = await fetch(`${ranked}&limit=${LABEL_NEXT_SHOWN}`);
  const withheld = any.ok ? parseCsv(await any.text()) : [];
  box.replaceChildren(h("p", { class: "muted" }, "No unlabeled images: every image has a label.",
    withheld.length ? [" The budget only hid some of them, to score the pseudo-labels; ranked the same way, "
      + "these would come first (", h("a", { href: ranked }, "all of them"), ", CSV):"] : []),
  ...withheld.map((row) => thumbnail(run)(row)));
}

// The images first in line have margins near 0: in whole percents all of them read "margin 0%".
const marginText = (margin) => (margin === 0 || !(margin < 0.01) ? pct(margin, 0)
  : margin >= 0.0001 ? pct(margin, 2) : "<0.01%");

// One image to label: its thumbnail, the model's label and the margin it was ranked by (the
// whole label, its confidence and, for an image whose label the budget withheld, that label on
// hover), and the `choice` of a label for it where it has none; clicked, the image opens
// larger (512 px), to tell what it shows. A long label is cut to the thumbnail's width, the
// margin never: cut, "margin 100%" read "margin 10…".
const thumbnail = (run) => (row, choice = null) => labelFigure({
  src: row.image_id ? `/api/datasets/${run.dataset_id}/images/${row.image_id}/thumbnail` : null,
  path: row.path, alt: row.path,
  title: `${row.path}: ${row.label}, confidence ${pct(Number(row.confidence), 0)}`
    + (row.hidden_label ? `; labeled ${row.hidden_label}` : ""),
}, [h("span", { class: "label" }, row.label),
  h("span", { class: "margin" }, `margin ${marginText(Number(row.margin))}`)], choice);

async function drawDownloads(run, classNames) {
  const predictions = run.artifacts.find((a) => a.name === "predictions.csv");
  const links = [
    { href: `/api/runs/${run.id}/checkpoint`, text: "Checkpoint (zip: model, config, training record)", id: "download-checkpoint" },
    { href: `/api/runs/${run.id}/model.onnx`, text: "ONNX model, to serve without PyTorch (made at the first download: seconds)", id: "download-onnx" },
    ...run.artifacts.filter((a) => a !== predictions).map((a) => ({ href: a.url, text: a.name, size: a.size_bytes })),
    { href: `/api/runs/${run.id}/predictions.csv`, text: "Predictions for the unlabeled images (CSV)", size: predictions?.size_bytes },
    { href: `/api/runs/${run.id}/label-next.csv`, text: "Label next: smallest margin between the top two classes first (CSV)" },
  ];
  document.getElementById("downloads").replaceChildren(...links.map((link) => h("li", {},
    h("a", { href: link.href, download: "", id: link.id }, link.text),
    link.size ? h("span", { class: "muted" }, ` ${bytes(link.size)}`) : null)));

  // The exported config.json names what timm needs; the run's settings are the fallback.
  let architecture = run.config.backbone;
  let numClasses = classNames.length;
  let whiteLevel = null;
  const config = run.artifacts.find((a) => a.name === "config.json");
  if (config) {
    try {
      const exported = await getJSON(config.url);
      architecture = exported.architecture ?? architecture;
      numClasses = exported.num_classes ?? numClasses;
      whiteLevel = exported.input_white_level ?? null;
    } catch (error) {
      console.warn("config.json unavailable:", error.message);
    }
  }
  // The name the server gives the zip, and the token when the server asks for one.
  const zip = `run-${run.id}-checkpoint.zip`;
  const signedIn = Boolean(document.querySelector(".signout"));
  const auth = signedIn ? ' -H "Authorization: Bearer $SELFTUNE_API_TOKEN"' : "";
  document.getElementById("snippet-token-note").hidden = signedIn; // the command has it
  document.getElementById("snippet-download").textContent =
    `curl${auth} -o ${zip} ${location.origin}/api/runs/${run.id}/checkpoint\nunzip ${zip}`;
  // Same as the README: the exported pretrained_cfg carries the input size, mean and std the
  // model was trained with, so timm's transform matches the run's evaluation; a dataset
  // with images of more than 8 bits adds how to read them.
  document.getElementById("snippet").textContent = timmSnippet({ architecture, numClasses, whiteLevel });
  // The command line's `predict` (README) takes the zip as downloaded.
  document.getElementById("snippet-predict").textContent =
    `.venv/bin/python -m worker.selftuning predict --model ${zip} --images new-images/ --out labels.csv`;
}
