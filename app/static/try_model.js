// A finished run's "Try the model": images chosen or dropped here are labeled by the exported
// model on the server (POST /api/runs/{id}/predict, app/try_model.py), and each shows beside
// its most likely classes. Nothing is kept, on the server or here.
import { count, failure, fetchJSON, h, pct } from "/static/charts.js";

const TOP = 5; // classes shown per image
const counted = (n, noun) => `${count(n)} ${noun}${n === 1 ? "" : "s"}`; // "1 image", "2 images"

export function tryModel(run) {
  const card = document.getElementById("try-model");
  const exported = new Set(run.artifacts.map((a) => a.name));
  if (!card || run.status !== "succeeded" || !exported.has("model.safetensors") || !exported.has("config.json")) return;
  if (card.dataset.ready) return; // the results are drawn again when the run is read again
  card.dataset.ready = "1";
  card.hidden = false;
  const maxImages = Number(card.dataset.maxImages);
  const input = document.getElementById("try-files");
  const said = document.getElementById("try-status");
  const error = document.getElementById("try-error");
  const results = document.getElementById("try-results");
  // As the downloads' snippets: with the token when the server asks for one.
  const auth = document.querySelector(".signout") ? ' -H "Authorization: Bearer $SELFTUNE_API_TOKEN"' : "";
  document.getElementById("snippet-try").textContent =
    `curl${auth} -F file=@photo.jpg -F file=@another.png ${location.origin}/api/runs/${run.id}/predict`;
  let previews = []; // the object URLs the results show, let go when replaced
  let busy = false;

  const send = async (chosen) => {
    const files = [...chosen];
    if (busy || !files.length) return;
    const sent = files.slice(0, maxImages);
    busy = true;
    input.disabled = true;
    error.replaceChildren();
    said.textContent = `Labeling ${counted(sent.length, "image")}…`;
    const form = new FormData();
    for (const file of sent) form.append("file", file, file.name);
    try {
      const { body } = await fetchJSON(`/api/runs/${run.id}/predict?top=${TOP}`, { method: "POST", body: form });
      for (const url of previews) URL.revokeObjectURL(url);
      previews = sent.map((file) => URL.createObjectURL(file));
      results.replaceChildren(...body.images.map((image) => tried(image, previews[image.index])));
      const skipped = body.images.filter((image) => image.skipped !== null).length;
      const labeled = body.images.length - skipped;
      said.textContent = `Labeled ${counted(labeled, "image")} in ${body.seconds < 0.05 ? "under 0.1" : body.seconds.toFixed(1)} s`
        + (skipped ? `; ${counted(skipped, "file")} could not be read` : "")
        + (files.length > sent.length ? `; the first ${count(sent.length)} of the ${count(files.length)} chosen (at most ${count(maxImages)} at a time)` : "")
        + ".";
    } catch (problem) {
      said.textContent = "";
      error.replaceChildren(...failure("Could not label the images", problem));
    } finally {
      busy = false;
      input.disabled = false;
      input.value = ""; // the same files chosen again are sent again
    }
  };

  input.addEventListener("change", () => send(input.files));
  card.addEventListener("dragover", (event) => {
    if (!event.dataTransfer?.types.includes("Files")) return;
    event.preventDefault();
    card.classList.add("over");
  });
  card.addEventListener("dragleave", (event) => {
    if (!card.contains(event.relatedTarget)) card.classList.remove("over");
  });
  card.addEventListener("drop", (event) => {
    if (!event.dataTransfer?.files.length) return;
    event.preventDefault();
    card.classList.remove("over");
    send(event.dataTransfer.files);
  });
}

// One image sent: its preview and name, then its classes, most likely first, each with its
// probability as a bar (the per-class table's); or why it could not be read.
function tried(image, preview) {
  const picture = h("img", { src: preview, alt: image.name, width: 96, height: 96 });
  // A TIFF, say: labeled on the server, but the browser does not show it.
  picture.addEventListener("error", () => picture.replaceWith(h("span", { class: "no-preview muted" }, "no preview")));
  const answer = image.skipped !== null
    ? [h("p", { class: "error" }, image.skipped)]
    : [h("p", { class: "tried-label" }, h("strong", {}, image.label), ` ${pct(image.confidence, 1)}`),
      h("table", { class: "tried-top" }, h("tbody", {}, image.top.map((choice) => {
        const share = h("td", { class: "share" }, pct(choice.probability, 1));
        share.style.setProperty("--share", `${choice.probability * 100}%`);
        return h("tr", {}, h("td", { class: "name" }, choice.label), share);
      })))];
  return h("figure", { class: "tried", "data-index": image.index }, picture,
    h("figcaption", {}, h("span", { class: "tried-name" }, image.name), ...answer));
}

// An experiment's "Try the models": the same images through the model of each method and
// budget (its first finished seed), one request a run, in a table of an image a row and a
// model a column. `runsNow()` gives the experiment's runs as the page has them; `refresh()`
// shows the card once one has succeeded.
export function tryModels(runsNow, title) {
  const card = document.getElementById("try-models");
  const input = document.getElementById("try-models-files");
  const said = document.getElementById("try-models-status");
  const error = document.getElementById("try-models-error");
  const table = document.getElementById("try-models-table");
  const maxImages = Number(card.dataset.maxImages);
  let previews = [];
  // One model per method and budget, the lowest seed that succeeded, in the page's order.
  const models = () => {
    const chosen = new Map();
    for (const run of runsNow()) {
      if (run.status !== "succeeded") continue;
      const key = `${run.method} ${run.budget_label}`;
      if (!chosen.has(key) || chosen.get(key).seed > run.seed) chosen.set(key, run);
    }
    return [...chosen.values()];
  };

  input.addEventListener("change", async () => {
    const files = [...input.files].slice(0, maxImages);
    const runs = models();
    if (!files.length || !runs.length) return;
    input.disabled = true;
    error.replaceChildren();
    const answers = [];
    try {
      for (const [n, run] of runs.entries()) {
        said.textContent = `Labeling ${counted(files.length, "image")} with model ${n + 1} of ${runs.length}…`;
        const form = new FormData();
        for (const file of files) form.append("file", file, file.name);
        answers.push((await fetchJSON(`/api/runs/${run.id}/predict?top=1`, { method: "POST", body: form })).body);
      }
    } catch (problem) {
      said.textContent = "";
      error.replaceChildren(...failure("Could not label the images", problem));
      input.disabled = false;
      input.value = "";
      return;
    }
    for (const url of previews) URL.revokeObjectURL(url);
    previews = files.map((file) => URL.createObjectURL(file));
    const head = h("tr", {}, h("th", {}, "Image"), runs.map((run) => h("th", { scope: "col" },
      h("a", { href: `/runs/${run.id}` }, title(run.method)), h("br"),
      h("small", { class: "muted" }, `${run.budget_label}, seed ${run.seed}`))));
    const rows = files.map((file, index) => {
      const thumb = h("img", { src: previews[index], alt: "", width: 48, height: 48, class: "tried-thumb" });
      // A TIFF, say, or a file that is no image: no broken picture (as on the run page).
      thumb.addEventListener("error", () => thumb.replaceWith(h("span", { class: "no-preview muted" }, "no preview")));
      const images = answers.map((answer) => answer.images[index]);
      const reasons = new Set(images.map((image) => image.skipped));
      // A file no model could read: why, once across the models, not once a column.
      const cells = reasons.size === 1 && images[0].skipped !== null
        ? [h("td", { class: "error", colspan: images.length }, images[0].skipped)]
        : images.map((image) => (image.skipped !== null ? h("td", { class: "error" }, image.skipped)
          : h("td", {}, h("strong", {}, image.label), ` ${pct(image.confidence, 0)}`)));
      return h("tr", {}, h("th", { scope: "row", class: "name" }, thumb, " ", file.name), cells);
    });
    table.replaceChildren(h("thead", {}, head), h("tbody", {}, rows));
    table.hidden = false;
    said.textContent = `${counted(files.length, "image")} through ${counted(runs.length, "model")}`
      + (input.files.length > files.length ? `; the first ${count(files.length)} of the ${count(input.files.length)} chosen` : "") + ".";
    input.disabled = false;
    input.value = "";
  });

  return { refresh: () => { card.hidden = !runsNow().some((run) => run.status === "succeeded"); } };
}
