// The experiment pages: the start form (/experiments/new) and one experiment's live runs
// table, accuracy-against-budget chart, paper-style table, what more labels would buy, and
// cancel-all, run-again and delete (/experiments/{id}).
import {
  badge, budgetChart, count, duration, failure, feedPosition, fetchJSON, follow, getJSON, h, handFocus, isNumber, onRestored, pageData,
  pct, RERUNNABLE, showStatus, signedOutNotice, signInAgain, tabTitle, TERMINAL,
} from "/static/charts.js";
import { renamer } from "/static/rename.js";
import { tryModels } from "/static/try_model.js";
import { endNotice } from "/static/notify.js";
import { onSession } from "/static/session.js";

// --- the start form ------------------------------------------------------------------------

// "15%, 0.3, 4/class, all" -> [0.15, 0.3, {per_class: 4}, "all"]. The API takes fractions
// and {per_class}; the "%" and "/class" spellings are the form's, so their mistakes are
// reported here, and everything else (0 %, 150 %, a class without labels) by the API.
function parseBudgets(text) {
  const budgets = [];
  const errors = [];
  for (const token of text.split(",").map((t) => t.trim()).filter(Boolean)) {
    let match;
    if (/^all$/i.test(token)) budgets.push("all");
    else if ((match = token.match(/^(\d+(?:\.\d+)?)\s*%$/))) {
      budgets.push(Number((Number(match[1]) / 100).toPrecision(12)));
    } else if ((match = token.match(/^(\d+)\s*(?:\/|per)\s*class$/i))) {
      budgets.push({ per_class: Number(match[1]) });
    } else if (token !== "" && Number.isFinite(Number(token))) budgets.push(Number(token));
    else errors.push(`“${token}” is not a budget: write 15%, 0.15, 4/class or all`);
  }
  return { budgets, errors };
}

// Whole numbers; anything else is an error reported with the budgets' (all at once).
function parseSeeds(text) {
  const seeds = [];
  const errors = [];
  for (const token of text.split(",").map((t) => t.trim()).filter(Boolean)) {
    if (/^-?\d+$/.test(token)) seeds.push(Number(token));
    else errors.push(`“${token}” is not a seed: write whole numbers such as 0, 1, 2`);
  }
  return { seeds, errors };
}

// FastAPI reports a union (budgets) once per branch; keep the branch of the value we sent.
const UNION_BRANCH = { number: "float", object: "PerClassBudget", string: "str" };

export function experimentForm() {
  const form = document.getElementById("experiment-form");
  const data = pageData("form-data");
  const overrideInputs = [...form.querySelectorAll("[name^='overrides.']")];
  const keyOf = (input) => input.name.slice("overrides.".length);
  const preset = () => data.presets[form.elements.preset.value].values;

  // The preset's values, and over them `changed` (an experiment's own, the form opened with
  // its settings: ?like=).
  function fillFromPreset(changed = {}) {
    document.getElementById("preset-about").textContent = data.presets[form.elements.preset.value].about;
    const defaults = preset();
    const values = { ...defaults, ...changed };
    for (const input of overrideInputs) {
      const value = values[keyOf(input)];
      if (input.type === "checkbox") input.checked = Boolean(value);
      else {
        input.value = Array.isArray(value) ? value.join(", ") : value;
        // A cleared number field runs with the preset's value: shown where it was typed.
        if (input.type === "number") input.placeholder = `${defaults[keyOf(input)]} (preset)`;
      }
    }
  }

  // What a field whose number cannot be read says (a whole-number field given 2.5 is the
  // API's to refuse: "must be a whole number, not 2.5").
  const NOT_A_NUMBER = {
    int: "Not a whole number: write it like 300.",
    float: "Not a number: write it like 0.01 or 1e-3.",
  };

  // Only what differs from the preset is sent, so the experiment records what was changed.
  // A number the browser cannot read ("1e-") is an error: its input's value is "", which
  // would otherwise pass for a cleared field and run with the preset's value.
  function overrides(errors = []) {
    const values = preset();
    const changed = {};
    for (const input of overrideInputs) {
      const key = keyOf(input);
      let value;
      if (input.type === "checkbox") value = input.checked;
      else if (input.dataset.kind === "choice") value = input.value;
      else if (input.dataset.kind === "list") {
        // "0.5, 0.75" -> [0.5, 0.75]; empty means none. A bad number stays as text, so the
        // API's 422 names the field.
        value = input.value.split(",").map((s) => s.trim()).filter((s) => s !== "")
          .map((s) => (Number.isFinite(Number(s)) ? Number(s) : s));
        if (JSON.stringify(value) !== JSON.stringify(values[key])) changed[key] = value;
        continue;
      } else if (input.validity.badInput) {
        errors.push({ field: input.name, message: NOT_A_NUMBER[input.dataset.kind] });
        continue;
      } else if (input.value.trim() === "") continue; // cleared: the preset's value stands
      else value = Number(input.value);
      if (value !== values[key]) changed[key] = value;
    }
    return changed;
  }

  // errors: [{field, message}] found before anything is sent.
  function payload() {
    const methods = [...form.querySelectorAll("input[name=methods]:checked")].map((i) => i.value);
    const parsed = parseBudgets(form.elements.budgets.value);
    const seeds = parseSeeds(form.elements.seeds.value);
    const errors = [
      ...parsed.errors.map((message) => ({ field: "budgets", message })),
      ...seeds.errors.map((message) => ({ field: "seeds", message })),
    ];
    // None is chosen when the dataset the link named is gone (the page says so).
    if (!form.elements.dataset_id.value) errors.push({ field: "dataset_id", message: "Choose a dataset." });
    const { budgets } = parsed;
    return {
      errors,
      body: {
        dataset_id: Number(form.elements.dataset_id.value),
        name: form.elements.name.value.trim(),
        backbone: form.elements.backbone.value.trim(),
        methods,
        budgets,
        seeds: seeds.seeds,
        preset: form.elements.preset.value,
        overrides: overrides(errors),
      },
    };
  }

  const runCount = document.getElementById("run-count");
  function countRuns() {
    const { body } = payload();
    // A value given twice is one run (the server refuses the repeat and says so).
    const budgets = new Set(body.budgets.map((b) => JSON.stringify(b === 1 ? "all" : b))).size;
    const seeds = new Set(body.seeds).size;
    const total = body.methods.length * budgets * seeds;
    const plural = (n, noun) => `${n} ${noun}${n === 1 ? "" : "s"}`;
    runCount.textContent = `This sweep is ${plural(total, "run")} (${plural(body.methods.length, "method")}` +
      ` × ${plural(budgets, "budget")} × ${plural(seeds, "seed")}).`;
  }

  function clearErrors() {
    for (const p of form.querySelectorAll(".field-error, #form-error")) {
      p.hidden = true;
      p.textContent = "";
    }
    for (const field of form.querySelectorAll(".field.invalid")) field.classList.remove("invalid");
  }

  function showError(fieldName, message) {
    const field = fieldName && form.querySelector(`[data-field="${CSS.escape(fieldName)}"]`);
    const target = field ? field.querySelector(".field-error") : document.getElementById("form-error");
    if (field) field.classList.add("invalid");
    target.textContent = target.textContent ? `${target.textContent} ${message}` : message;
    target.hidden = false;
  }

  // Keyboard users land on the first field to fix (the disabled Start button lost focus);
  // an error of the whole form keeps focus on Start.
  function focusFirstError() {
    const field = form.querySelector(".field.invalid");
    const input = field?.querySelector("input, select, textarea") ?? document.getElementById("start");
    input.focus({ preventScroll: true });
    (field ?? document.getElementById("form-error")).scrollIntoView({ block: "center" });
  }

  // The API names a list's items by their index ("budgets[1]: the same budget as
  // budgets[0]"); beside the field a person typed the list in, their places say it ("the 2nd
  // budget: the same budget as the 1st").
  function inWords(field, message) {
    const noun = { budgets: "budget", seeds: "seed", methods: "method" }[field];
    if (!noun) return message;
    const place = (i) => {
      const n = Number(i) + 1;
      const tens = n % 100;
      return `${n}${tens >= 11 && tens <= 13 ? "th" : { 1: "st", 2: "nd", 3: "rd" }[n % 10] ?? "th"}`;
    };
    return message
      .replace(new RegExp(`^${field}\\[(\\d+)\\]:`), (_, i) => `the ${place(i)} ${noun}:`)
      .replace(new RegExp(`\\b${field}\\[(\\d+)\\]`, "g"), (_, i) => `the ${place(i)}`);
  }

  // detail: [{loc: ["body", field, index-or-key, branch?], msg}] -> [{field, message}].
  function apiErrors(detail, sent) {
    if (!Array.isArray(detail)) {
      return [{ field: null, message: typeof detail === "string" ? detail : "The server refused the form." }];
    }
    const errors = [];
    for (const { loc = [], msg } of detail) {
      const [, field, sub, branch] = loc;
      if (typeof sub === "number" && typeof branch === "string") {
        const value = sent[field]?.[sub];
        if (branch !== UNION_BRANCH[typeof value]) continue;
      }
      if (field === "overrides" && typeof sub === "string") errors.push({ field: `overrides.${sub}`, message: msg });
      else if (typeof sub === "number") errors.push({ field, message: inWords(field, `${field}[${sub}]: ${msg}`) });
      else errors.push({ field, message: inWords(field, msg) });
    }
    return errors;
  }

  // What Start would refuse ([{field, message}]), each beside its field, and Start greyed
  // with the reason (its description) while any stands. It is not disabled: pressed, it puts
  // the keyboard on the first field to fix, and the server, which has the last word, answers
  // in the same places. The same refusals again are left as they are, so a screen reader
  // does not hear them at every keystroke.
  const start = document.getElementById("start");
  const startBlocked = document.getElementById("start-blocked");
  let refusalsShown = "[]";
  function showRefusals(errors, { again = false } = {}) {
    const key = JSON.stringify(errors);
    if (key === refusalsShown && !again) return;
    refusalsShown = key;
    clearErrors();
    errors.forEach(({ field, message }) => showError(field, message));
    const places = [];
    const general = [];
    for (const { field, message } of errors) {
      const label = field && form.querySelector(`[data-field="${CSS.escape(field)}"]`)
        ?.querySelector("label, legend")?.textContent.replace("(optional)", "").trim();
      if (label) {
        if (!places.includes(label)) places.push(label);
      } else general.push(message);
    }
    const fix = places.length
      ? `fix ${places.length > 1 ? `${places.slice(0, -1).join(", ")} and ${places.at(-1)}` : places[0]} above`
      : null;
    const reason = [...general, fix].filter(Boolean).join("; ");
    startBlocked.textContent = errors.length ? `Cannot start yet: ${reason.replace(/\.$/, "")}.` : "";
    startBlocked.hidden = !errors.length;
    start.classList.toggle("refused", errors.length > 0);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    checksAsked += 1; // a check still on its way answers an older form: Start's answer counts
    clearTimeout(checkTimer);
    const { body, errors } = payload();
    if (errors.length) { // with the server's refusals of the other fields, all at once
      const { refusals } = await askCheck(body, errors);
      showRefusals(refusals, { again: true });
      focusFirstError();
      return;
    }
    start.disabled = true;
    try {
      const { response, answer } = await postJson("/api/experiments", body);
      if (response.status === 201) {
        window.location.assign(`/experiments/${answer.id}`);
        return;
      }
      if (response.status === 401) {
        // The sign-in expired: keep what was typed for the way back from the sign-in page.
        saveDraft();
        window.location.assign(`/login?next=${encodeURIComponent(location.pathname + location.search)}`);
        return;
      }
      const refused = apiErrors(answer.detail ?? `${response.status} ${response.statusText}`, body);
      if (response.status === 422) showRefusals(refused, { again: true });
      else { // not the form's fault (the queue is down, say): Start stays on
        showRefusals([], { again: true });
        refused.forEach(({ field, message }) => showError(field, message));
      }
    } catch (error) {
      showRefusals([], { again: true });
      showError(null, `Could not reach the server (${error.message}); try again.`);
    } finally {
      start.disabled = false;
    }
    focusFirstError();
  });

  // The form's body posted as JSON: the answer, and its JSON (empty when it has none).
  async function postJson(url, body) {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
    });
    return { response, answer: await response.json().catch(() => ({})) };
  }

  // The form as typed, kept in this tab's sessionStorage across a sign-in: every named input
  // by name (a checkbox by name and value, as the methods share one name).
  const draftKey = `experiment-form-draft:${location.pathname}${location.search}`;
  const draftName = (input) => (input.type === "checkbox" ? `${input.name}=${input.value}` : input.name);
  function saveDraft() {
    const fields = [...form.elements].filter((input) => input.name)
      .map((input) => [draftName(input), input.type === "checkbox" ? input.checked : input.value]);
    try {
      sessionStorage.setItem(draftKey, JSON.stringify(fields));
    } catch (error) {
      console.warn("could not keep the form:", error.message);
    }
  }
  function restoreDraft() {
    let fields;
    try {
      fields = JSON.parse(sessionStorage.getItem(draftKey));
      sessionStorage.removeItem(draftKey);
    } catch (error) {
      return;
    }
    if (!Array.isArray(fields)) return;
    const saved = new Map(fields);
    // The preset first: choosing it fills in the hyper-parameters the draft then overwrites.
    if (saved.has("preset") && data.presets[saved.get("preset")]) {
      form.elements.preset.value = saved.get("preset");
      fillFromPreset();
    }
    for (const input of form.elements) {
      if (!input.name || !saved.has(draftName(input))) continue;
      const value = saved.get(draftName(input));
      if (input.type === "checkbox") input.checked = Boolean(value);
      else input.value = value;
    }
    document.getElementById("draft-note").hidden = false;
  }

  // What the server would make of the form (POST /api/experiments/check), asked a moment
  // after the last change: its warnings (a method left without unlabeled images, an image
  // size that fills the worker's disk) show under the form, and its refusals (an unknown
  // backbone, a budget that leaves a class without labels) and the form's own (a budget it
  // cannot read) beside their fields, before Start is pressed. The answer to an older form
  // is dropped.
  const warningsBox = document.getElementById("form-warnings");
  let checksAsked = 0;
  let checkTimer;
  // The form's own refusals (`errors`) and the server's of the other fields: a seed that is
  // not a number no longer hid that no method was chosen until it was mended.
  async function askCheck(body, errors) {
    try {
      const { response, answer } = await postJson("/api/experiments/check", body);
      if (response.ok) return { warnings: errors.length ? [] : answer.warnings, refusals: errors };
      if (response.status === 422) {
        const mine = new Set(errors.map(({ field }) => field));
        const theirs = apiErrors(answer.detail, body).filter(({ field }) => !mine.has(field));
        return { warnings: [], refusals: [...errors, ...theirs] };
      }
      // Anything else (an expired sign-in, the server down) is not the form's: Start says it.
    } catch (error) {
      console.warn("could not check the form:", error.message); // Start says it, if it lasts
    }
    return { warnings: [], refusals: errors };
  }

  async function checkForm() {
    const { body, errors } = payload();
    const asked = ++checksAsked;
    const { warnings, refusals } = await askCheck(body, errors);
    if (asked !== checksAsked) return;
    warningsBox.replaceChildren(...warnings.map((warning) => h(
      "p", { class: "warning" }, `${warning[0].toUpperCase()}${warning.slice(1)}.`)));
    showRefusals(refusals);
  }
  function checkSoon() {
    checksAsked += 1; // the form changed: an answer on its way is about the old one
    clearTimeout(checkTimer);
    checkTimer = setTimeout(checkForm, 400);
  }

  // The budgets start as the chosen dataset's (the paper's ladder, less the budgets that
  // dataset cannot tell apart: classes of three labeled images keep one at 15 % and at
  // 30 %). Choosing another dataset swaps them while they are still the suggestion; what the
  // user typed stays. This runs before the form's own listeners count and check it.
  // An experiment's budgets (?like=) were chosen, not suggested: they stay.
  const suggestedBudgets = new Map(data.datasets.map((d) => [String(d.id), d.budgets]));
  let suggestion = data.like ? null : form.elements.budgets.value;
  form.elements.dataset_id.addEventListener("change", () => {
    if (suggestion === null) return;
    const next = suggestedBudgets.get(form.elements.dataset_id.value) ?? suggestion;
    if (form.elements.budgets.value.trim() === suggestion.trim()) form.elements.budgets.value = next;
    suggestion = next;
  });

  form.elements.preset.addEventListener("change", () => fillFromPreset());
  for (const type of ["input", "change"]) {
    form.addEventListener(type, countRuns);
    form.addEventListener(type, checkSoon);
  }
  fillFromPreset(data.changed);
  restoreDraft();
  if (suggestion !== null) { // the draft's dataset
    suggestion = suggestedBudgets.get(form.elements.dataset_id.value) ?? suggestion;
  }
  countRuns();
  checkForm();
}

// --- one experiment ------------------------------------------------------------------------

// The best of a budget (a method in the results table, a run in the runs table) is marked in
// words, not by the cell's colour alone, which a screen reader does not say and not every
// eye tells apart: a star to see, "best" to hear.
const bestMark = () => h("span", { class: "best-mark" },
  h("span", { "aria-hidden": "true" }, "★ "), h("span", { class: "sr-only" }, "best: "));

const IDLE_POLL_MS = 5000; // how often a page whose runs all ended looks for a requeued one
// How often a page with queued runs reads their queue positions again: runs of other
// experiments ahead of them start and end without a word on this page's feed.
const QUEUE_POLL_MS = 10000;

// A time left as a person says it: "under a minute", "12 min", "3 h 5 min".
function roughly(seconds) {
  if (seconds < 60) return "under a minute";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  return duration(Math.round(seconds / 60) * 60);
}

export function experimentPage() {
  const { experiment: initial, methodTitles, feedFrom: pageFeedFrom } = pageData("experiment-data");
  const id = initial.id;
  renamer(`/api/experiments/${id}`, (name) => { initial.name = name; });
  const title = (method) => methodTitles[method] ?? method;
  const runs = new Map(initial.runs.map((run) => [run.id, { ...run }]));
  const models = tryModels(() => [...runs.values()], title);
  let table = initial.budget_table;
  let estimates = initial.label_estimates;
  let chart = null;
  const resultsNote = document.getElementById("results-note");
  const waitingForResults = resultsNote.textContent; // "Results appear here as runs finish…"

  const rows = new Map(); // run id -> {tr, cells}
  const tbody = document.querySelector("#runs tbody");
  for (const run of runs.values()) {
    const cells = {
      status: h("td"), progress: h("td", { class: "num" }), accuracy: h("td", { class: "num" }),
    };
    // "#12" is what the column shows; a screen reader's list of links, out of the table, needs
    // which run it is (the name holds "#12" too, so speech input still finds it).
    const name = `Run #${run.id}: ${title(run.method)}, ${run.budget_label}, seed ${run.seed}`;
    const tr = h("tr", { "data-run-id": run.id },
      h("td", {}, h("a", { href: `/runs/${run.id}`, "aria-label": name }, `#${run.id}`)),
      h("td", {}, title(run.method)), h("td", {}, run.budget_label), h("td", { class: "num" }, run.seed),
      cells.status, cells.progress, cells.accuracy);
    rows.set(run.id, { tr, cells });
    tbody.append(tr);
  }

  function drawRun(run) {
    const { cells } = rows.get(run.id);
    // Where a queued run stands in the queue, which all experiments share.
    const position = run.status === "queued" && isNumber(run.queue_position)
      ? h("small", { class: "muted queue-position", title: "runs are taken in the order they were queued" },
        run.queue_position === 1 ? " next" : ` position ${run.queue_position}`)
      : null;
    // Why a run failed or was lost, or why a queued one waits: one line, cut to the column's
    // width on screen (whole on hover and to a screen reader); its page has the rest.
    const reason = run.error_line
      ? h("small", { class: "muted run-reason", title: run.error_line }, run.error_line) : null;
    cells.status.replaceChildren(...[badge(run.status), position, reason].filter(Boolean));
    const share = run.total_steps ? run.step / run.total_steps : 0;
    cells.progress.replaceChildren(
      h("span", { class: "step" }, `${count(run.step)} / ${count(run.total_steps)}`), " ",
      h("progress", { max: 1, value: share, "aria-label": `Training progress of run #${run.id}` }));
    drawAccuracy(run);
    models.refresh();
  }

  // While training, the latest evaluation; once finished, the final score. A run that
  // ended without one (cancelled, failed) has none: its last evaluation is not a result.
  function drawAccuracy(run) {
    const { cells } = rows.get(run.id);
    const latest = run.status === "running" && isNumber(run.live_top1) ? run.live_top1 : null;
    cells.accuracy.replaceChildren(...[bestIds.has(run.id) ? bestMark() : null,
      pct(run.test_top1 ?? latest)].filter(Boolean));
    cells.accuracy.title = !isNumber(run.test_top1) && latest !== null ? "latest evaluation" : "";
  }

  // The best finished runs of each budget (highest final test top-1, ties each) are
  // highlighted and marked, as the results table marks its best methods.
  let bestIds = new Set();
  function markBest() {
    const finished = [...runs.values()].filter((run) => run.status === "succeeded" && isNumber(run.test_top1));
    const top = new Map(); // budget label -> its highest final test top-1
    for (const run of finished) {
      top.set(run.budget_label, Math.max(top.get(run.budget_label) ?? -Infinity, run.test_top1));
    }
    const isBest = (run) => run.test_top1 === top.get(run.budget_label);
    bestIds = new Set(finished.filter(isBest).map((run) => run.id));
    for (const [runId, { tr }] of rows) tr.classList.toggle("best", bestIds.has(runId));
    for (const run of runs.values()) drawAccuracy(run);
  }

  // The runs of a cell without a result, by status: "1 running, 1 cancelled".
  const STATUS_ORDER = ["running", "queued", "succeeded", "cancelled", "failed", "lost"];
  function withoutResult(method, budget) {
    const counts = new Map();
    for (const run of runs.values()) {
      if (run.method !== method || run.budget_label !== budget) continue;
      if (run.status === "succeeded" && isNumber(run.test_top1)) continue;
      // A success without a score is rare (an old record): say it has none.
      const status = run.status === "succeeded" ? "without a score" : run.status;
      counts.set(status, (counts.get(status) ?? 0) + 1);
    }
    const rank = (status) => (STATUS_ORDER.includes(status) ? STATUS_ORDER.indexOf(status) : 99);
    return [...counts].sort((a, b) => rank(a[0]) - rank(b[0])).map(([status, n]) => `${n} ${status}`);
  }

  function drawResults() {
    // The table comes ordered from fewest labels to most.
    const budgets = [...new Set(table.map((row) => row.budget_label))];
    const labeled = new Map(table.map((row) => [row.budget_label, row.labeled_count]));
    const methods = initial.methods;
    const cell = (method, budget) => table.find((r) => r.method === method && r.budget_label === budget);

    const head = h("tr", {}, h("th", {}, "Method"), budgets.map((b) => h("th", { class: "num" }, b,
      isNumber(labeled.get(b)) ? h("small", { class: "muted labeled-count" }, h("br"), `${labeled.get(b).toLocaleString("en")} labels`) : null)));
    const body = methods.map((method) => h("tr", { "data-method": method }, h("th", {}, title(method)),
      budgets.map((budget) => {
        const row = cell(method, budget);
        if (!row) return h("td", { class: "num muted" }, "");
        const others = withoutResult(method, budget);
        if (!isNumber(row.mean_top1)) {
          // Still to come, or never: every run of the cell ended without a result. Runs that
          // ended (cancelled, say) are named, or "0/2 runs" reads as two still to come.
          const ended = row.runs - row.finished - row.pending;
          return row.pending > 0
            ? h("td", { class: "num muted" }, `${row.finished}/${row.runs} runs`,
              ended > 0 ? ` (${others.join(", ")})` : null)
            : h("td", { class: "num muted", title: `${row.runs} run(s) ended without a result: ${others.join(", ")}` }, "no result");
        }
        const spread = row.finished > 1 ? ` ± ${(row.std_top1 * 100).toFixed(1)}` : "";
        // A mean over fewer seeds than asked for says which, and why: "(1 of 2; 1 cancelled)".
        const note = others.length ? `; ${others.join(", ")}` : "";
        return h("td", { class: `num${row.best ? " best" : ""}`, title: `mean of ${row.finished} of ${row.runs} seeds` },
          row.best ? bestMark() : null, `${(row.mean_top1 * 100).toFixed(1)}${spread}`,
          row.finished < row.runs ? h("small", { class: "muted" }, ` (${row.finished} of ${row.runs}${note})`) : null);
      })));
    document.querySelector("#budget-table thead").replaceChildren(head);
    document.querySelector("#budget-table tbody").replaceChildren(...body);

    const series = methods.map((method) => ({
      name: method,
      title: title(method),
      means: budgets.map((b) => cell(method, b)?.mean_top1 ?? null),
      spreads: budgets.map((b) => cell(method, b)?.std_top1 ?? null),
    }));
    if (chart) chart.destroy();
    chart = budgetChart(document.getElementById("budget-chart"),
      budgets.map((label) => ({ label, count: labeled.get(label) })), series);
    const anyResult = table.some((row) => isNumber(row.mean_top1));
    resultsNote.hidden = anyResult;
    // Every run ended without a result (cancelled, failed): none will appear, until one is
    // queued again.
    const noneToCome = table.length && table.every((row) => row.pending === 0);
    resultsNote.textContent = !anyResult && noneToCome
      ? "No run of this experiment ended with a result: see the runs below." : waitingForResults;
  }

  // Per method, the log-linear fit's answer to "what would twice the labels buy?".
  function drawEstimates() {
    const labels = (n) => `${n.toLocaleString("en")} labels`;
    const points = (share) => {
      const rounded = Math.round(share * 1000) / 10; // no "−0.0"
      return `${rounded < 0 ? "−" : "+"}${Math.abs(rounded).toFixed(1)}`;
    };
    const inTableOrder = initial.methods.flatMap((method) => estimates.filter((e) => e.method === method));
    // A line that does not rise predicts nothing (one unlucky seed can tilt it; the server
    // then gives no prediction), and a gain smaller than its standard error is within the
    // scatter of the runs: say so.
    const rises = (e) => isNumber(e.predicted_top1_at_double);
    const withinScatter = (e) => isNumber(e.gain_per_doubling_se) && e.gain_per_doubling_se > 0
      && e.gain_per_doubling_se >= Math.abs(e.gain_per_doubling);
    // Twice the labels may be more than the dataset holds: say so.
    const short = (e) => !isNumber(e.images_left) || e.images_left >= e.extra_labels ? ""
      : e.images_left === 0 ? "; this dataset has no more images"
        : `; this dataset has ${e.images_left.toLocaleString("en")} more images`;
    const body = inTableOrder.map((e) => h("tr", { "data-method": e.method },
      h("th", {}, title(e.method)),
      h("td", { class: "num" }, `${pct(e.measured_top1)} at ${labels(e.n_max)}`),
      rises(e)
        ? h("td", { class: "num" }, `${pct(e.predicted_top1_at_double)} at ${labels(2 * e.n_max)}`,
          h("small", { class: "muted" }, ` (+${e.extra_labels.toLocaleString("en")}${short(e)})`))
        : h("td", { class: "num muted" }, "none: top-1 did not rise with labels in these runs"),
      h("td", { class: "num", title: `fitted on ${e.n_points} runs` },
        points(e.gain_per_doubling),
        isNumber(e.gain_per_doubling_se) ? ` ± ${(e.gain_per_doubling_se * 100).toFixed(1)}` : "",
        " points",
        withinScatter(e) ? h("small", { class: "muted" }, " (within the scatter of the runs)") : "")));
    document.querySelector("#label-estimates tbody").replaceChildren(...body);
    for (const id of ["label-estimates", "estimates-caveat"]) {
      document.getElementById(id).hidden = estimates.length === 0;
    }
    document.getElementById("estimates-note").hidden = estimates.length > 0;
  }

  // How long until the runs still to go have trained, after those of other experiments queued
  // before them, on the workers that answer: the record's estimate, counted down between reads
  // while runs train (these or those ahead of them).
  let timeLeft = { left: initial.time_left, readAt: Date.now() };
  function drawTimeLeft() {
    const { left, readAt } = timeLeft;
    document.getElementById("time-left-row").hidden = !left;
    if (!left) return;
    const runsToGo = `${count(left.runs)} run${left.runs === 1 ? "" : "s"} to go`;
    const ahead = left.ahead_runs === 0 ? "" : `, after ${count(left.ahead_runs)} run${
      left.ahead_runs === 1 ? "" : "s"} of other experiments`;
    const training = left.ahead_runs > 0 || [...runs.values()].some((run) => run.status === "running");
    const seconds = left.seconds - (training ? (Date.now() - readAt) / 1000 : 0);
    const names = left.untimed_methods.map(title);
    const methods = names.length > 1 ? `${names.slice(0, -1).join(", ")} and ${names.at(-1)}` : names[0];
    const notes = [];
    if (left.untimed_runs > 0) {
      notes.push(`${left.untimed_runs === 1 ? `the ${methods} run is` : `the ${
        count(left.untimed_runs)} ${methods} runs are`} timed once one has trained a little`);
    }
    if (left.ahead_untimed_runs > 0) {
      notes.push(`${count(left.ahead_untimed_runs)} of those ahead ${
        left.ahead_untimed_runs === 1 ? "is" : "are"} not timed yet`);
    }
    // As the lists say it (pages.py's time_left_text): "about 12 min", "over 12 min" while
    // runs are not timed yet.
    const lead = notes.length ? (seconds < 60 ? "a minute or more" : `over ${roughly(seconds)}`)
      : (seconds < 60 ? "under a minute" : `about ${roughly(seconds)}`);
    const text = left.untimed_runs === left.runs && left.seconds === 0
      ? `${runsToGo}${ahead}: timed once the first has trained a little`
      : [`${lead}: ${runsToGo}${ahead}, ${
        left.workers > 1 ? `${count(left.workers)} workers taking them` : "one after another"}`,
      ...notes].join("; ");
    document.getElementById("time-left").textContent = text;
  }
  setInterval(drawTimeLeft, 5000);

  // Between two of its runs on one worker (one ended, the next not taken yet) a running
  // experiment is "in progress" for a moment: said once it has lasted BETWEEN_RUNS_MS, so the
  // badge does not flicker running → in progress → running at each run's end.
  const BETWEEN_RUNS_MS = 5000;
  let shownStatus = initial.status;
  let betweenRuns = null;
  function drawStatus(status) {
    clearTimeout(betweenRuns);
    if (status === "in progress" && shownStatus === "running") {
      betweenRuns = setTimeout(() => showNow(status), BETWEEN_RUNS_MS);
      return;
    }
    showNow(status);
  }
  function showNow(status) {
    shownStatus = status;
    showStatus(document.getElementById("experiment-status"), status);
    drawTitle();
  }

  // The tab says how the sweep stands: "queued", runs ended of all ("3/12") while any trains,
  // then how it ended ("finished with failures"); the counts until the record says so.
  const STILL_GOING = new Set(["queued", "running", "in progress"]);
  function drawTitle() {
    const ended = [...runs.values()].filter((run) => TERMINAL.has(run.status)).length;
    const waiting = [...runs.values()].every((run) => run.status === "queued");
    tabTitle({ state: shownStatus === "deleted" || (ended === runs.size && !STILL_GOING.has(shownStatus))
      ? shownStatus : waiting ? "queued" : `${ended}/${runs.size}` });
  }

  // Cancel all while a run has not ended; delete once every run has. Run again while a run
  // ended without finishing (failed, cancelled, lost).
  let cancelling = false; // asked to cancel: running runs stop within about one iteration
  let requeueing = false; // asked to queue the ended runs again, not yet answered
  // How many of `list` have each of `statuses`, those with none left out: "2 failed, 1 lost".
  const tally = (statuses, list) => [...statuses]
    .map((status) => [status, list.filter((run) => run.status === status).length])
    .filter(([, n]) => n).map(([status, n]) => `${n} ${status}`).join(", ");
  const active = () => [...runs.values()].filter((run) => !TERMINAL.has(run.status));
  const rerunnable = () => [...runs.values()].filter((run) => RERUNNABLE.has(run.status));
  // A desktop notification once every run has ended, where asked for (notify.js).
  const notice = endNotice(document.getElementById("notify-end"),
    document.getElementById("notify-note"), `notify-experiment-${id}`);
  let going = active().length > 0;
  function noticeEnd(left) {
    notice.update(left > 0);
    if (going && left === 0) {
      const ended = tally(TERMINAL, [...runs.values()]);
      notice.ended(`${document.getElementById("title-name").textContent}: every run has ended`,
        `${ended} (experiment #${id})`);
    }
    going = left > 0;
  }
  function drawActions() {
    const focused = document.activeElement;
    const left = active().length;
    noticeEnd(left);
    if (left === 0) cancelling = false;
    const again = rerunnable();
    const requeueAll = document.getElementById("requeue-all");
    requeueAll.hidden = again.length === 0;
    requeueAll.setAttribute("aria-disabled", requeueing); // as Cancel all, below
    requeueAll.textContent = requeueing ? "Queuing…" : `Run ${plural(again.length, "run")} again`;
    const kinds = tally(RERUNNABLE, again);
    requeueAll.title = `Queue again the runs that ended without finishing (${kinds}); each resumes from its last checkpoint`;
    const cancelAll = document.getElementById("cancel-all");
    cancelAll.hidden = left === 0;
    // Off while cancelling, but aria-disabled rather than disabled, so that it keeps the
    // keyboard until the runs have ended (then Delete, in its place, takes it): disabled as
    // it was pressed, it sent the keyboard to the heading before the server had answered,
    // and left it there when the answer was a refusal.
    cancelAll.setAttribute("aria-disabled", cancelling);
    cancelAll.textContent = cancelling ? "Cancelling…" : "Cancel all runs";
    const deleteButton = document.getElementById("delete-experiment");
    deleteButton.hidden = left > 0;
    handFocus(focused, cancelAll, [deleteButton]);
    handFocus(focused, deleteButton, [cancelAll]); // a run queued again: it can be cancelled
    handFocus(focused, requeueAll, [cancelAll]); // the runs it queued can be cancelled there
    drawTitle();
  }

  // Follow the feed while a run has not ended; the server closes it after the last run.
  // Then a run may be queued again (from its own page, another tab or the API), which no
  // open feed tells this page: look at the record every few seconds while the tab is shown,
  // and at once when it is shown again. A run found active brings the feed back.
  let feed = null;
  // Where the feed is followed from: the page's first, after the last event before the page
  // read the experiment (the record has the news of those, the latest evaluations included);
  // one followed again, after the last event of the one before, or of the experiment's
  // before a requeue (its answer says). With none in Redis, the feed tells it all.
  let feedFrom = pageFeedFrom ?? "";
  let idlePoller = null;
  let deleted = false;
  // This page's delete is under way: it reads nothing more, since a read answered once the
  // delete is done is a 404 (the browser logs it) and the page is about to leave.
  let deleting = false;
  // Signed out (in another tab, or the feed or a read was refused): nothing is followed
  // until a sign-in, which the page hears of from the tab that signs in.
  let signedOut = false;
  const liveState = document.getElementById("live-state");
  function watch() {
    if (feed || deleted || signedOut) return;
    if (active().length === 0) {
      pollWhileIdle();
      return;
    }
    clearInterval(idlePoller);
    idlePoller = null;
    feed = follow(`/api/experiments/${id}/events`, {
      after: feedFrom,
      onEvent,
      isLast: (event) => event.type === "experiment_end",
      onResync: refreshSoon,
      onClosed: refreshSoon, // an expired sign-in or a deleted experiment says so there
      onState: (state) => {
        liveState.textContent = state === "live" ? "● live" : state === "ended" ? "" : "reconnecting…";
        if (state === "ended") {
          feedFrom = feed?.lastId() || feedFrom;
          feed = null;
          pollWhileIdle(); // also if the read after the end fails
        }
      },
    });
  }

  function pollWhileIdle() {
    if (idlePoller !== null || deleted || signedOut) return;
    idlePoller = setInterval(lookForActivity, IDLE_POLL_MS);
  }

  // How many times the feed, or an action's answer (Cancel all, Run again), has changed a
  // run's status. An answer asked for before the last change may be older than what the page
  // shows: the cancel's, sent while a run still ran, can arrive after the feed said the run
  // ended, and drawn it would bring the run back (and hide Delete with the keyboard on it); a
  // read asked before Run again, answered after it, showed the runs cancelled again. Such an
  // answer gives way to a read asked after.
  let statusNews = 0;

  // Redraw only when a run changed (queued again, or queued and ended again between two
  // looks): an ended experiment's page otherwise stays still.
  async function lookForActivity() {
    if (document.hidden || feed || deleted || deleting || signedOut) return;
    try {
      const asked = statusNews;
      const fresh = await getJSON(`/api/experiments/${id}`);
      const changed = (summary) => {
        const run = runs.get(summary.id);
        return run && (run.status !== summary.status || run.finished_at !== summary.finished_at);
      };
      if (fresh.runs.some(changed)) applyExperiment(fresh, asked);
    } catch (error) {
      refreshFailed(error);
    }
  }
  document.addEventListener("visibilitychange", lookForActivity);

  // The API's answer (a read or the cancel) is the record: draw every run and the summary.
  function applyExperiment(fresh, asked) {
    if (asked !== statusNews) {
      refreshSoon();
      return;
    }
    for (const summary of fresh.runs) {
      const run = runs.get(summary.id);
      if (!run) continue;
      Object.assign(run, summary, { step: Math.max(run.step, summary.step) });
      drawRun(run);
    }
    table = fresh.budget_table;
    estimates = fresh.label_estimates;
    timeLeft = { left: fresh.time_left, readAt: Date.now() };
    drawTimeLeft();
    drawStatus(fresh.status);
    markBest();
    drawResults();
    drawEstimates();
    drawActions();
    watch();
  }

  // The database has the authoritative summary (means, spreads, best); read it again
  // whenever a run ends, at most once per half second.
  let refreshTimer = null;
  function refreshSoon() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refresh, 500);
  }

  async function refresh() {
    if (deleting) return;
    try {
      const asked = statusNews;
      applyExperiment(await getJSON(`/api/experiments/${id}`), asked);
      // Signed in again (in another tab, say): the link to do so has had its day.
      if (actionError.querySelector(".sign-in-again")) actionError.replaceChildren();
    } catch (error) {
      refreshFailed(error);
    }
  }

  function refreshFailed(error) {
    if (error.status === 404) gone();
    else if (error.status === 401) stopForSignIn(signInAgain());
    else console.warn("experiment refresh failed:", error.message);
  }

  function stopForSignIn(message) {
    if (deleted || signedOut) return; // the first word on it stays
    signedOut = true;
    clearInterval(idlePoller);
    idlePoller = null;
    if (feed) feed.stop();
    actionError.replaceChildren(...message);
  }

  onSession({
    signedOut: () => stopForSignIn(signedOutNotice("this experiment")),
    signedIn: () => {
      if (!signedOut) return;
      signedOut = false;
      refreshSoon(); // the record, then the feed again; the sign-in link goes
    },
  });

  // Deleted from another tab: stop following it and say so.
  function gone() {
    deleted = true;
    clearInterval(idlePoller);
    if (feed) feed.stop();
    document.getElementById("cancel-all").hidden = true;
    document.getElementById("requeue-all").hidden = true;
    document.getElementById("delete-experiment").hidden = true;
    drawStatus("deleted");
    actionError.textContent = `Experiment #${id} no longer exists: it was deleted.`;
  }

  const actionError = document.getElementById("action-error");
  const plural = (n, noun) => `${n} ${noun}${n === 1 ? "" : "s"}`;

  document.getElementById("cancel-all").addEventListener("click", () => {
    const left = active();
    if (left.length === 0 || cancelling) return;
    const queued = left.filter((run) => run.status === "queued").length;
    const running = left.length - queued;
    const what = [
      queued ? `${queued} queued ${queued === 1 ? "ends" : "end"} at once` : null,
      running ? `${running} running ${running === 1 ? "stops" : "stop"} within about one iteration` : null,
    ].filter(Boolean).join("; ");
    if (!window.confirm(`Cancel the ${plural(left.length, "run")} of this experiment not yet ended? ${what[0].toUpperCase()}${what.slice(1)}.`)) return;
    cancelling = true; // until the runs have ended, unless refused
    act("cancel", "Could not cancel", (answered) => { if (!answered) cancelling = false; });
  });

  document.getElementById("requeue-all").addEventListener("click", () => {
    if (requeueing || rerunnable().length === 0) return;
    requeueing = true;
    act("requeue", "Could not queue them again", () => { requeueing = false; });
  });

  // POST an action of the experiment (cancel, requeue) and draw its answer: news that reads
  // asked before it give way to (`statusNews`). `settle(answered)` ends the action's own state
  // first. Refused, the buttons come back as the page knows the runs, the refusal is said
  // beside them, and the record is read again (a requeue's 503 failed the run it could not
  // queue: the record says which).
  async function act(action, refusal, settle) {
    actionError.textContent = "";
    drawActions();
    try {
      const asked = statusNews;
      const { body: fresh, headers } = await fetchJSON(`/api/experiments/${id}/${action}`,
        { method: "POST" });
      feedFrom = feedPosition(headers) || feedFrom;
      settle(true);
      applyExperiment(fresh, asked);
      statusNews += 1;
    } catch (error) {
      settle(false);
      drawActions();
      actionError.replaceChildren(...failure(refusal, error));
      refreshSoon();
    }
  }

  // Off while the delete is under way, as Cancel all while cancelling: aria-disabled, so that
  // the keyboard stays on it, and on it still when a refusal is said.
  document.getElementById("delete-experiment").addEventListener("click", async () => {
    if (deleting) return;
    if (!window.confirm(`Delete “${initial.name}” with its ${plural(runs.size, "run")}, their ` +
      "checkpoints and downloads? The dataset stays. This cannot be undone.")) return;
    actionError.textContent = "";
    const button = document.getElementById("delete-experiment");
    button.setAttribute("aria-disabled", "true");
    deleting = true;
    clearTimeout(refreshTimer);
    try {
      await getJSON(`/api/experiments/${id}`, { method: "DELETE" });
      window.location.assign("/experiments");
    } catch (error) {
      deleting = false;
      button.setAttribute("aria-disabled", "false");
      actionError.replaceChildren(...failure("Could not delete", error));
      refreshSoon();
    }
  });

  function onEvent(event) {
    // experiment_end, or events Redis no longer kept are missing: the record says it all.
    if (event.type === "experiment_end" || event.type === "dropped") {
      refreshSoon();
      return;
    }
    const run = runs.get(event.run_id);
    if (!run) return;
    const before = run.status;
    // A resumed attempt starts at its checkpoint's step, perhaps before what the page has.
    if (isNumber(event.step)) run.step = event.type === "started" ? event.step : Math.max(run.step, event.step);
    if (event.type === "status" && event.status) run.status = event.status;
    if (run.status === "queued") delete run.live_top1; // queued again: a new attempt's numbers
    if (["started", "progress", "eval", "checkpoint"].includes(event.type)) run.status = "running";
    if (event.type === "eval" && isNumber(event.test_top1)) run.live_top1 = event.test_top1;
    if (event.type === "end") {
      run.status = event.status;
      if (isNumber(event.metrics?.test_top1)) run.test_top1 = event.metrics.test_top1;
    }
    if (run.status !== before) {
      statusNews += 1;
      delete run.error_line; // the last attempt's; the record read after has the new one
    }
    drawRun(run);
    drawActions();
    // A run that starts or ends changes the summary (means, best, the experiment's status).
    // The record also settles what a replay of old events showed on the way.
    if (event.type === "status" || event.type === "end") refreshSoon();
  }

  // Deleted while the page was kept (from here: Delete, then the list), it says so (gone());
  // still there, it shows the experiment as it is now. Its Delete was left greyed.
  onRestored(() => {
    if (deleted || signedOut) return;
    deleting = false;
    document.getElementById("delete-experiment").setAttribute("aria-disabled", "false");
    refresh();
  });

  setInterval(() => {
    const waiting = [...runs.values()].some((run) => run.status === "queued");
    if (waiting && !document.hidden && !deleted && !signedOut) refreshSoon();
  }, QUEUE_POLL_MS);

  drawStatus(initial.status);
  drawTimeLeft();
  for (const run of runs.values()) drawRun(run);
  markBest();
  drawResults();
  drawEstimates();
  drawActions();
  watch();
}
