// Shared helpers of the experiment and run pages: DOM building, number formats, Chart.js
// set-ups, and a live feed (Server-Sent Events) that survives network drops and restarts.
/* global Chart */

export function pageData(id) {
  return JSON.parse(document.getElementById(id).textContent);
}

// h("td", {class: "num"}, "12") -> <td class="num">12</td>; text children are escaped.
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "style" && typeof value === "object") Object.assign(node.style, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// A 401 on an open page means the sign-in cookie expired (or the token changed). The
// server's text is written for API clients (it names the Authorization header); a person
// needs the sign-in page, which brings them back here.
export function signInAgain() {
  const next = location.pathname + location.search;
  return ["Your sign-in expired: ",
    h("a", { href: `/login?next=${encodeURIComponent(next)}`, class: "sign-in-again" }, "sign in again"),
    ", then try once more."];
}

// Signed out in another tab: the page stops following and says how to start again.
export function signedOutNotice(following) {
  const next = location.pathname + location.search;
  return ["You signed out in another tab: ",
    h("a", { href: `/login?next=${encodeURIComponent(next)}`, class: "sign-in-again" }, "sign in again"),
    ` to follow ${following} live.`];
}

// What to show for a failed request of an action ("Could not cancel").
export function failure(action, error) {
  return error.status === 401 ? signInAgain() : [`${action}: ${error.message}`];
}

export async function getJSON(url, options = {}) {
  return (await fetchJSON(url, options)).body;
}

// getJSON's answer with its headers: { body, headers }.
export async function fetchJSON(url, options = {}) {
  const response = await fetch(url, { headers: { Accept: "application/json" }, ...options });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(typeof body?.detail === "string" ? body.detail : response.statusText);
    error.status = response.status;
    error.body = body;
    throw error;
  }
  return { body, headers: response.headers };
}

// A requeue's answer names the followed feed's last event before it (app/live.py): a page
// following again from there gets what came since, not the whole story told again (its
// statuses flickered through their old values on the way).
export const feedPosition = (headers) => headers.get("Feed-Last-Event-ID") ?? "";

export const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
export const pct = (value, digits = 1) => (isNumber(value) ? (value * 100).toFixed(digits) + "%" : "–");

export function duration(seconds) {
  if (!isNumber(seconds)) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 2 * 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`; // not "177 h 46 min"
}

// A whole number with thousands separated, as the server's pages write them: "990,190".
export function count(n) {
  return isNumber(n) ? n.toLocaleString("en-US") : "–";
}

// The units of the server's own messages (app.responses.human_bytes): "512 bytes", "1.5 KiB".
export function bytes(n) {
  if (!isNumber(n)) return "";
  const units = ["bytes", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function badge(status) {
  return h("span", { class: `badge ${status.replaceAll(" ", "-")}` }, status);
}

// The status badge of a page's live region (role=status): drawn anew only when the status
// changes. A screen reader reads the region again whenever its content is replaced, the same
// word too, and the pages redraw their status at every event and every poll: "running" was
// heard every few seconds all through a run.
export function showStatus(node, status) {
  if (node.firstElementChild?.textContent === status) return;
  node.replaceChildren(badge(status));
}

// Where the keyboard goes when the button it was on (`focused` before a redraw) hid itself or
// turned off: Run again once pressed, Cancel once pressed or once the run ended. To the first
// of `others` shown and on, the button that took its place, else to the page's heading
// (tabindex=-1), which holds the status; Chromium put it on <body>, so Tab went on from the
// top of the page and a screen reader was told nothing.
export function handFocus(focused, button, others) {
  if (focused !== button || (!button.hidden && !button.disabled)) return;
  const next = others.find((other) => !other.hidden && !other.disabled);
  (next ?? document.querySelector("main h1")).focus();
}

// Back or Forward to a page the browser kept (its back/forward cache) shows it as it was left,
// scripts and all, with no load: what it shows may have been deleted since, on this very page
// before it moved on (Delete, then the list) or elsewhere, and its buttons still offered it.
// `check` reads it again; the dataset page (upload.js, not a module) does the same.
export function onRestored(check) {
  window.addEventListener("pageshow", (event) => { if (event.persisted) check(); });
}

// The tab's title: the page's own, after how its work stands ("3/12 · animals quick — Self-Tuning
// Lab", "succeeded · Run #7 — …"), so that a sweep can be followed from another tab. `state`
// and `name` (after a rename) each stay until changed.
const SITE = " — Self-Tuning Lab";
const tab = { state: "", name: document.title.endsWith(SITE) ? document.title.slice(0, -SITE.length) : document.title };
export function tabTitle({ state = tab.state, name = tab.name } = {}) {
  Object.assign(tab, { state, name });
  document.title = `${state ? `${state} · ` : ""}${name}${SITE}`;
}

// "lost" lasts only once a run has used up its automatic requeues.
export const TERMINAL = new Set(["succeeded", "failed", "cancelled", "lost"]);
export const RERUNNABLE = new Set(["failed", "cancelled", "lost"]); // what /requeue accepts

// A method has one colour on every chart; other series take the next colour of their chart.
const PALETTE = ["#2f6fde", "#d9480f", "#2b8a3e", "#ae3ec9", "#0c8599", "#f59f00", "#c2255c",
  "#495057", "#5c940d", "#1864ab"];
const METHOD_COLOURS = { "self-tuning": PALETTE[0], "fine-tune": PALETTE[1], fixmatch: PALETTE[2] };
export function colourFor(name, index = 0) {
  return METHOD_COLOURS[name] ?? PALETTE[index % PALETTE.length];
}

// Log axes label their powers of ten; the in-between ticks crowd each other. An axis that
// spans under three of them also labels 2 and 5 times each: a learning rate stepped down
// once (0.002 to 0.0002) read "0.001" alone, neither of the rates it trained at.
function logTick(value, _index, ticks) {
  const mantissa = Number((value / 10 ** Math.floor(Math.log10(value) + 1e-9)).toPrecision(3));
  const decades = Math.log10(ticks.at(-1).value / ticks[0].value);
  return mantissa === 1 || (decades < 3 && (mantissa === 2 || mantissa === 5)) ? value : "";
}

// Error bars for line charts: a dataset with `errorBars: [±value per point]` gets a
// whisker at every point (Chart.js has no built-in error bars).
const errorBarsPlugin = {
  id: "errorBars",
  afterDatasetsDraw(chart) {
    const { ctx } = chart;
    chart.data.datasets.forEach((dataset, index) => {
      const meta = chart.getDatasetMeta(index);
      if (!dataset.errorBars || meta.hidden) return;
      const scale = chart.scales[meta.yAxisID];
      ctx.save();
      ctx.strokeStyle = dataset.borderColor;
      ctx.lineWidth = 1.5;
      meta.data.forEach((point, i) => {
        const spread = dataset.errorBars[i];
        const mean = dataset.data[i];
        if (!isNumber(spread) || !isNumber(mean) || spread === 0) return;
        const top = scale.getPixelForValue(mean + spread);
        const bottom = scale.getPixelForValue(mean - spread);
        ctx.beginPath();
        ctx.moveTo(point.x, top); ctx.lineTo(point.x, bottom);
        ctx.moveTo(point.x - 5, top); ctx.lineTo(point.x + 5, top);
        ctx.moveTo(point.x - 5, bottom); ctx.lineTo(point.x + 5, bottom);
        ctx.stroke();
      });
      ctx.restore();
    });
  },
};

const percentTicks = { callback: (value) => `${Math.round(value * 100)}%` };

function baseOptions({ percent = false, xTitle, yTitle, yType = "linear" } = {}) {
  return {
    responsive: true,
    maintainAspectRatio: false,
    animation: false, // live charts redraw often; animating every append only costs CPU
    interaction: { mode: "nearest", intersect: false },
    plugins: {
      legend: { position: "bottom", labels: { boxWidth: 12 } },
      tooltip: percent ? { callbacks: { label: (c) => `${c.dataset.label}: ${pct(c.parsed.y)}` } } : {},
    },
    scales: {
      x: { title: { display: Boolean(xTitle), text: xTitle } },
      y: {
        type: yType,
        title: { display: Boolean(yTitle), text: yTitle },
        ...(percent ? { min: 0, max: 1, ticks: percentTicks } : {}),
        ...(yType === "logarithmic" ? { ticks: { callback: logTick, autoSkip: false } } : {}),
      },
    },
  };
}

// --- what a screen reader is told of a chart ---------------------------------------------
// A chart's canvas has role=img; its aria-label is its name (the page's, kept here) and a
// short summary of what it draws, written anew as points arrive. A label, not a live region:
// it is read when the reader reaches the chart, never spoken at each point.
const chartNames = new WeakMap(); // canvas -> the name the page gave it
const stepCharts = new WeakMap(); // canvas -> how its summary reads its values

function describe(canvas, summary) {
  if (!chartNames.has(canvas)) chartNames.set(canvas, canvas.getAttribute("aria-label"));
  canvas.setAttribute("aria-label", `${chartNames.get(canvas)}: ${summary}`);
}

// A value as the chart's axis reads it: a share in percent, else three significant digits.
const valueText = (value, percent) => (percent ? pct(value) : String(Number(value.toPrecision(3))));

// "top-1: latest 50.0%, highest 52.0% at iteration 10": the latest point of a line and its
// extreme (`extreme`: "lowest" for losses, "highest" for accuracies, none for a schedule).
function lineSummary(name, points, { percent, extreme }) {
  const latest = points.at(-1);
  let text = `${name}: latest ${valueText(latest.y, percent)}`;
  if (extreme && points.length > 1) {
    const better = extreme === "lowest" ? (a, b) => a.y < b.y : (a, b) => a.y > b.y;
    const best = points.reduce((kept, point) => (better(point, kept) ? point : kept));
    text += `, ${extreme} ${valueText(best.y, percent)} at iteration ${count(best.x)}`;
  }
  return text;
}

// A chart over training iterations; fill it with setSeries(). `extreme`: which end of its
// values its summary names ("lowest", "highest"; none by default).
export function stepChart(canvas, { percent = false, yTitle, yType, extreme = null } = {}) {
  stepCharts.set(canvas, { percent, extreme });
  const options = baseOptions({ percent, xTitle: "iteration", yTitle, yType });
  // From iteration 0, whole iterations: one evaluation alone is not a 95-105 axis.
  Object.assign(options.scales.x, { type: "linear", min: 0, ticks: { precision: 0 } });
  options.parsing = false; // points are {x, y} already
  options.normalized = true;
  // A long run logs 100,000 points a line: draw at most a few per pixel column.
  options.plugins.decimation = { enabled: true, algorithm: "min-max" };
  canvas.parentNode.classList.add("empty");
  describe(canvas, "no points yet.");
  return new Chart(canvas, { type: "line", data: { datasets: [] }, options });
}

// series: Map(name -> [{x, y}] sorted by x). Keeps one dataset per name, in first-seen order.
// `lastStep` (the run's iterations), when known, ends the x axis there on every chart alike.
export function setSeries(chart, series, lastStep) {
  if (lastStep > 0) chart.options.scales.x.max = lastStep;
  for (const [name, points] of series) {
    let dataset = chart.data.datasets.find((d) => d.label === name);
    if (!dataset) {
      const colour = colourFor(name, chart.data.datasets.length);
      dataset = { label: name, data: [], borderColor: colour, backgroundColor: colour,
        borderWidth: 1.5, pointRadius: 0, pointHitRadius: 6, spanGaps: true,
        clip: 6 }; // a point on the frame (100 %, the last step) is drawn whole
      chart.data.datasets.push(dataset);
    }
    dataset.data = points;
    dataset.pointRadius = points.length < 30 ? 2.5 : 0; // few points (evals) need markers
  }
  const box = chart.canvas.parentNode;
  box.classList.toggle("empty", !chart.data.datasets.some((d) => d.data.length));
  chart.update("none");
  const lines = [...series].filter(([, points]) => points.length);
  if (!lines.length) { // what the empty chart shows (app.css)
    const ended = box.closest(".ended") ? "none: the run ended before its first point" : "no points yet";
    describe(chart.canvas, `${box.dataset.empty ?? ended}.`);
    return;
  }
  const last = Math.max(...lines.map(([, points]) => points.at(-1).x));
  const how = stepCharts.get(chart.canvas);
  describe(chart.canvas, `${lines.length} line${lines.length === 1 ? "" : "s"} up to iteration `
    + `${count(last)}${lastStep > 0 ? ` of ${count(lastStep)}` : ""}. `
    + `${lines.map(([name, points]) => lineSummary(name, points, how)).join("; ")}.`);
}

// How far apart (a factor on the log axis) budgets with the same labeled count are drawn.
const SAME_COUNT_STEP = 1.08;
const TICK_GAP_PX = 8; // between two budget names on one line

// Budgets close together on the log axis (12 and 13 labels, or two datasets' "10%" and
// "4/class") wrote their names over each other: each name goes on the first line of names
// where it clears the one before it. Measured on the scale's whole width, as it is when its
// ticks are built (the y axis takes a little of it later): a little more room than drawn.
function tickRows(scale, values, text) {
  const { min, max } = scale.options;
  const span = Math.log(max / min);
  const width = scale.width - 50; // about what the y axis and its title take
  const { ctx } = scale;
  ctx.save();
  ctx.font = `${Chart.defaults.font.size}px ${Chart.defaults.font.family}`;
  const ends = []; // the right end of each line of names so far, in pixels
  const rows = new Map();
  for (const value of [...values].sort((a, b) => a - b)) {
    const half = ctx.measureText(text(value)).width / 2;
    const centre = (Math.log(value / min) / span) * width;
    let row = ends.findIndex((end) => centre - half > end + TICK_GAP_PX);
    if (row < 0) row = ends.push(-Infinity) - 1;
    ends[row] = centre + half;
    rows.set(value, row);
  }
  ctx.restore();
  return rows;
}

// Test accuracy against label budget: one line per method, mean over seeds with error bars.
// `budgets`: [{label, count}] from fewest labels to most; each method's `means` and `spreads`
// follow them. x is the labeled image count on a log axis, as the label estimates fit it
// (3, 6 and 61 images are not evenly spaced), ticked at the budgets measured; only when a
// count is unknown (its dataset was deleted) are the budgets evenly spaced categories. A
// budget without a result breaks the line: joining its neighbours would draw a result
// nobody measured. Experiments compared (`spanGaps`) join their own points: the chart's
// budgets are those of all of them, and another dataset's "5%" is none of this line's.
export function budgetChart(canvas, budgets, methods) {
  const name = (b) => (isNumber(b.count) ? `${b.label} (${b.count.toLocaleString("en")})` : b.label);
  const byCount = budgets.length > 0 && budgets.every((b) => isNumber(b.count) && b.count > 0);
  const options = baseOptions({
    percent: true, yTitle: "test top-1",
    xTitle: byCount ? "label budget (labeled images, log scale)" : "label budget (labeled images)",
  });
  let labels = budgets.map(name);
  if (byCount) {
    // Budgets that keep as many labels (2/class and 6% of classes of 7, 64 and 24 images)
    // stand a little apart, so two results do not read as one with a spread; their tick
    // names both.
    const before = new Map();
    labels = budgets.map((b) => {
      const k = before.get(b.count) ?? 0;
      before.set(b.count, k + 1);
      return b.count * SAME_COUNT_STEP ** k;
    });
    const names = new Map();
    for (const b of budgets) names.set(b.count, [...(names.get(b.count) ?? []), b.label]);
    const tickName = (count) => `${names.get(count).join(" · ")} (${count.toLocaleString("en")})`;
    let rows = new Map();
    Object.assign(options.scales.x, {
      type: "logarithmic",
      min: Math.min(...labels) / 1.5, // a margin, so the end points are not on the frame
      max: Math.max(...labels) * 1.5,
      afterBuildTicks: (scale) => {
        scale.ticks = [...names.keys()].map((value) => ({ value }));
        rows = tickRows(scale, [...names.keys()], tickName);
      },
      // A name on its line of names (`tickRows`): a second line's under an empty first.
      ticks: { maxRotation: 0, callback: (value) => {
        if (!names.has(value)) return "";
        const row = rows.get(value) ?? 0;
        return row ? [...Array(row).fill(""), tickName(value)] : tickName(value);
      } },
    });
    options.plugins.tooltip.callbacks.title = (items) => {
      const budget = budgets[items[0]?.dataIndex];
      return budget ? name(budget) : "";
    };
  }
  options.plugins.tooltip.callbacks.label = (c) => {
    const spread = c.dataset.errorBars[c.dataIndex];
    return `${c.dataset.label}: ${pct(c.parsed.y)}${isNumber(spread) ? ` ± ${pct(spread)}` : ""}`;
  };
  // A line per method; where experiments are compared, per experiment (`dash`) and method,
  // drawn through the budgets it has no result at (`spanGaps`: the others' budgets).
  // `key`: the legend's shorter name, where there is one (the tooltip names the line whole).
  const datasets = methods.map(({ name: method, title, key, means, spreads, dash = [], spanGaps = false }) => ({
    label: title, key, data: means, errorBars: spreads, borderColor: colourFor(method),
    backgroundColor: colourFor(method), pointRadius: 4, spanGaps, borderWidth: 2, borderDash: dash,
  }));
  // Lines told apart by their dashes are keyed by a stretch of line each, dashed as theirs
  // (a filled box of the method's colour showed two experiments' lines alike).
  if (datasets.some((dataset) => dataset.borderDash.length)) {
    // With point styles Chart.js takes a key's style from the line's first point, which has
    // no dashes: they come from the line itself.
    const keys = Chart.defaults.plugins.legend.labels.generateLabels;
    Object.assign(options.plugins.legend.labels, {
      usePointStyle: true, pointStyle: "line", pointStyleWidth: 36,
      generateLabels: (chart) => keys(chart).map((key) => {
        const line = chart.data.datasets[key.datasetIndex];
        return { ...key, text: line.key ?? key.text, lineDash: line.borderDash };
      }),
    });
  }
  // Each method's best budget; the table under the chart has every value.
  const budgetName = (b) => (isNumber(b.count) ? `${b.label} (${count(b.count)} labels)` : b.label);
  // Of the budgets its own experiment has (`budgetCount`, where experiments are compared:
  // the chart's are all of theirs, and "25%" on two datasets is two of them).
  const best = methods.map(({ title, means, budgetCount = budgets.length }) => {
    const measured = budgets.map((budget, i) => ({ budget, mean: means[i] })).filter((r) => isNumber(r.mean));
    if (!measured.length) return `${title}: no result`;
    const top = measured.reduce((kept, r) => (r.mean > kept.mean ? r : kept));
    return `${title}: highest ${pct(top.mean)} at ${budgetName(top.budget)}, `
      + `${measured.length} of ${budgetCount} budget${budgetCount === 1 ? "" : "s"} measured`;
  });
  describe(canvas, `${best.join("; ")}. The table below has every value.`);
  return new Chart(canvas, { type: "line", data: { labels, datasets }, options,
    plugins: [errorBarsPlugin] });
}

// "2 series of 20 bars. predicted: highest 2.5% at species 03, lowest 0.8% at species 00; …"
function barsSummary(labels, datasets, format) {
  const bars = `${count(labels.length)} bar${labels.length === 1 ? "" : "s"}`;
  const each = datasets.map(({ label, data }) => {
    const values = data.map((value, i) => ({ value, at: labels[i] })).filter((bar) => isNumber(bar.value));
    if (!values.length) return `${label}: none`;
    const high = values.reduce((kept, bar) => (bar.value > kept.value ? bar : kept));
    const low = values.reduce((kept, bar) => (bar.value < kept.value ? bar : kept));
    if (values.length === 1) return `${label}: ${format(high.value)} at ${high.at}`;
    if (high.value === low.value) return `${label}: ${format(high.value)} each`;
    return `${label}: highest ${format(high.value)} at ${high.at}, lowest ${format(low.value)} at ${low.at}`;
  });
  return `${datasets.length > 1 ? `${datasets.length} series of ${bars}` : bars}. ${each.join("; ")}.`;
}

// Category names longer than this are cut on the axis (the tooltip has them whole): ten
// class names of 45 characters left the bars a corner of the chart. The confusion matrix
// cuts its column names the same way.
const TICK_CHARS = 16;
export const shortName = (label) => (label.length > TICK_CHARS ? `${label.slice(0, TICK_CHARS - 1)}…` : label);

// `fit` (with `percent`): the axis ends at the largest bar rather than at 100 %, and its ticks
// and tooltips have the digits to tell such bars apart: the classes' shares of a 1,000-class
// dataset are tenths of a percent, which a 0-100 % axis draws flat and calls "0.1%" alike.
export function barChart(canvas, labels, datasets, { percent = false, fit = false, xTitle, yTitle } = {}) {
  const options = baseOptions({ percent, xTitle, yTitle });
  const share = (value, digits) => `${Number((value * 100).toPrecision(digits))}%`;
  describe(canvas, barsSummary(labels, datasets, percent && fit ? (v) => share(v, 3) : (v) => valueText(v, percent)));
  if (percent && fit) {
    delete options.scales.y.max;
    options.scales.y.ticks = { callback: (value) => share(value, 2) };
    options.plugins.tooltip.callbacks.label = (c) => `${c.dataset.label}: ${share(c.parsed.y, 3)}`;
  }
  options.scales.x.ticks = {
    callback(value) {
      return shortName(String(this.getLabelForValue(value)));
    },
  };
  return new Chart(canvas, {
    type: "bar",
    data: {
      labels,
      datasets: datasets.map((d, i) => ({ backgroundColor: colourFor(d.label, i), ...d })),
    },
    options,
  });
}

// A browser opens at most six connections to one server over HTTP/1.1, and a live page holds
// one for its feed: with six run pages open in tabs, a seventh page of the app never loaded,
// nor did the six pages' own requests. A page hidden this long lets its feed go, and opens it
// again when shown, from the last event it had; a glance at another tab keeps it.
const HIDDEN_FOR_MS = 10000;

// Follows an SSE URL until `isLast(event)`. The browser's EventSource reconnects by itself
// and sends Last-Event-ID, so the server resends exactly what was missed. It gives up for
// good when a reconnect gets an HTTP error (a proxy's 502 while the app restarts); then we
// open a fresh one after a growing pause. After any interruption `onResync` runs, so the
// page can re-read the database record in case the live stream itself lost entries.
// `onClosed` hears each time the browser gives the stream up (the server refused it, e.g. an
// expired sign-in, or is down) before the next try: a read of the record tells which.
// A hidden page's feed rests (HIDDEN_FOR_MS; a page opened in a background tab opens it when
// first shown). A feed opened anew names the last event it had (`?last_event_id=`: an
// EventSource cannot send the header itself), so it too gets exactly what it missed; `after`
// names one to start after (that of a feed followed before, say), and `lastId()` tells it.
export function follow(url, {
  onEvent, isLast = () => false, onResync = () => {}, onState = () => {}, onClosed = () => {},
  after = "",
}) {
  let source = null;
  let timer = null;
  let pause = 1000;
  let interrupted = false;
  let stopped = false;
  let lastId = after;
  let resting = false;
  let hiddenTimer = null;

  function connect() {
    const resumed = lastId ? `${url}${url.includes("?") ? "&" : "?"}last_event_id=${encodeURIComponent(lastId)}` : url;
    source = new EventSource(resumed);
    source.onopen = () => {
      pause = 1000;
      onState("live");
      if (interrupted) {
        interrupted = false;
        onResync();
      }
    };
    source.onmessage = (message) => {
      if (message.lastEventId) lastId = message.lastEventId;
      const event = JSON.parse(message.data);
      onEvent(event);
      if (isLast(event)) stop();
    };
    source.onerror = () => {
      if (stopped) return;
      interrupted = true;
      onState("reconnecting");
      if (source.readyState === EventSource.CLOSED) {
        onClosed();
        timer = setTimeout(connect, pause);
        pause = Math.min(pause * 2, 30000);
      }
    };
  }

  function rest() {
    resting = true;
    clearTimeout(timer);
    if (source) source.close();
  }

  function onVisibility() {
    clearTimeout(hiddenTimer);
    if (stopped) return;
    if (document.visibilityState === "hidden") {
      if (!resting) hiddenTimer = setTimeout(rest, HIDDEN_FOR_MS);
    } else if (resting) {
      resting = false;
      connect();
    }
  }

  function stop() {
    stopped = true;
    clearTimeout(timer);
    clearTimeout(hiddenTimer);
    document.removeEventListener("visibilitychange", onVisibility);
    if (source) source.close();
    onState("ended");
  }

  document.addEventListener("visibilitychange", onVisibility);
  if (document.visibilityState === "hidden") resting = true;
  else connect();
  // Whether the feed is open and delivering now (not resting in a hidden tab, nor
  // reconnecting): one that is not has missed what came meanwhile.
  const live = () => !stopped && !resting && !interrupted && source?.readyState === EventSource.OPEN;
  return { stop, lastId: () => lastId, live };
}
