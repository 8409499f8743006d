// Add labels, on a dataset's page (and under a run's Label next): the chosen CSV, or the
// classes chosen under the images, go to POST /api/datasets/{id}/labels, and the page of the
// new dataset they make opens; a refusal shows under the form, which keeps what was chosen for
// another try.
import { failure, getJSON, h } from "/static/charts.js";

const IMAGES_SHOWN = 24; // unlabeled images on a dataset's page at first, and at each "Show more"

// The Idempotency-Key of one set of labels: sent again with the same labels (the first answer
// lost to the network, say), it opens the dataset the first try made instead of making a
// second. `renew` it whenever the labels change.
export function labelsKey() {
  let key = null;
  const fresh = () => Array.from(crypto.getRandomValues(new Uint8Array(16)),
    (byte) => byte.toString(16).padStart(2, "0")).join("");
  return { get: () => (key ??= fresh()), renew: () => { key = null; } };
}

// Sends a form with a labels CSV (`file`) under `key` (labelsKey) and opens the dataset it
// makes; a refusal rejects.
export async function makeLabeledDataset(datasetId, body, key) {
  const send = (headers = { "Idempotency-Key": key.get() }) => getJSON(
    `/api/datasets/${datasetId}/labels`, { method: "POST", body, headers: { Accept: "application/json", ...headers } });
  let dataset;
  try {
    dataset = await send();
  } catch (problem) {
    if (problem.status === 410) {
      key.renew(); // its dataset was made and deleted since: these labels make it again
      dataset = await send();
    } else if (problem.status === 503 && problem.message.includes("Idempotency-Key")) {
      dataset = await send({}); // Redis, which keeps the keys, is down: the labels need no key
    } else throw problem;
  }
  key.renew(); // made: this page sent back to (Back) makes another
  location.assign(`/datasets/${dataset.id}`);
}

export function labelAdder(datasetId) {
  const form = document.getElementById("add-labels-form");
  if (!form) return; // a dataset without unlabeled images has nothing to label
  const error = form.querySelector(".field-error");
  const send = form.querySelector("button[type=submit]");
  const key = labelsKey();
  form.addEventListener("input", key.renew); // another file or name: other labels
  const refuse = (lines) => {
    error.replaceChildren(...lines);
    error.hidden = false;
  };
  // Off while the labels are sent: aria-disabled, so that the keyboard stays on the button
  // (disabled, it dropped the focus to the page's start, and a refusal left it there).
  const busy = (state) => send.setAttribute("aria-disabled", String(state));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (send.getAttribute("aria-disabled") === "true") return;
    if (!form.elements.file.files.length) {
      refuse(["Choose the CSV file of labels first."]);
      form.elements.file.focus();
      return;
    }
    busy(true);
    error.hidden = true;
    try {
      await makeLabeledDataset(datasetId, new FormData(form), key);
    } catch (problem) {
      refuse(failure("Could not add the labels", problem));
      busy(false);
    }
  });
}

// The class a person gives an image, under its thumbnail: none at first (a caption above it
// may be the model's guess, not a label), or the one `given` it already (path -> class).
export const labelChoice = (path, classNames, given) => h("select", { class: "give-label", "aria-label": `Label of ${path}` },
  h("option", { value: "" }, "label…"),
  ...classNames.map((name) => h("option", { value: name, selected: given.get(path) === name }, name)));

const csvCell = (text) => (/[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text);

// The labels `given` (path -> class) make a new dataset of `datasetId`, as Add labels does,
// whose page then opens. `watch` each choice as it is shown.
export function labelingForm(datasetId, given, id) {
  const send = h("button", { type: "submit", disabled: true }, "Make a dataset with these labels");
  const note = h("span", { class: "muted", "aria-live": "polite" });
  const error = h("p", { class: "field-error", role: "alert", hidden: true });
  const form = h("form", { class: "add-labels", id }, send, note, error);
  const key = labelsKey();
  const watch = (choice, path) => choice.addEventListener("change", () => {
    if (choice.value) given.set(path, choice.value);
    else given.delete(path);
    key.renew();
    send.disabled = given.size === 0;
    note.textContent = given.size ? `${given.size} labeled: the new dataset has the same images and test split` : "";
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    // Off while sent: aria-disabled keeps the keyboard on the button (see labelAdder).
    if (send.disabled || send.getAttribute("aria-disabled") === "true") return;
    send.setAttribute("aria-disabled", "true");
    error.hidden = true;
    const csv = ["path,label", ...[...given].map((cells) => cells.map(csvCell).join(","))].join("\n");
    const body = new FormData();
    body.append("file", new Blob([csv + "\n"], { type: "text/csv" }), "labels.csv");
    try {
      await makeLabeledDataset(datasetId, body, key);
    } catch (problem) {
      error.replaceChildren(...failure("Could not make the dataset", problem));
      error.hidden = false;
      send.setAttribute("aria-disabled", "false");
    }
  });
  return { form, watch };
}

// An image to label, as a run's Label next and a dataset's page show it: its thumbnail (`src`;
// clicked, it opens larger: viewer.js), or its path where it has none, a `caption` and its
// class `choice`.
export const labelFigure = ({ src, path, alt, title }, caption, choice = null) => h("figure", { class: "thumb", title },
  src
    ? h("a", { class: "enlarge", href: `${src}?size=512`, target: "_blank", rel: "noopener" },
      h("img", { src, alt, loading: "lazy", width: 72, height: 72 }))
    : h("span", { class: "muted" }, path),
  h("figcaption", {}, ...caption), choice);

// "Show N more" under images to label (data-more: the larger view presses it too): `showMore`
// adds the next ones to `box`, at once or once the server sends them, and the keyboard then
// goes on to the first new image's choice.
export function showMoreButton(id, box, showMore) {
  const more = h("button", { type: "button", class: "secondary", id, "data-more": "" });
  more.addEventListener("click", async () => {
    const first = box.querySelectorAll("select.give-label").length;
    await showMore();
    box.querySelectorAll("select.give-label")[first]?.focus();
  });
  return more;
}

// The dataset page's unlabeled images, in storage order, each with a class to choose (the
// page shows the first few without it): IMAGES_SHOWN at a time, and the labels chosen make a
// new dataset. The images a run ranks (Label next) are the ones worth labeling first; this
// is for labeling any of them.
export function imageLabeler(datasetId, classNames) {
  const box = document.getElementById("unlabeled-thumbs");
  if (!box) return; // no unlabeled image
  const given = new Map();
  const { form, watch } = labelingForm(datasetId, given, "label-images-form");
  const more = showMoreButton("unlabeled-more", box, () => showMore());
  const rest = h("p", { class: "muted", id: "unlabeled-rest" });
  const error = h("p", { class: "field-error", role: "alert", hidden: true });
  let shown = 0;
  let total = Infinity;
  const image = (item) => {
    const path = item.original_path;
    const name = path.split("/").pop();
    const choice = labelChoice(path, classNames, given);
    watch(choice, path);
    return labelFigure({ src: `/api/datasets/${datasetId}/images/${item.id}/thumbnail`, path, alt: name, title: path },
      [h("span", { class: "label" }, name)], choice);
  };
  const showMore = async () => {
    if (more.disabled) return; // asked already: the same images would come twice
    more.disabled = true;
    try {
      const page = await getJSON(`/api/datasets/${datasetId}/images?split=unlabeled&limit=${IMAGES_SHOWN}&offset=${shown}`);
      total = page.total;
      if (shown === 0) box.replaceChildren(rest, form); // the first ones, now with a choice each
      rest.before(...page.items.map(image));
      shown += page.items.length;
      error.hidden = true;
    } catch (problem) {
      error.replaceChildren(...failure("Could not show more images", problem));
      error.hidden = false;
    }
    more.disabled = false;
    const left = total - shown;
    more.textContent = `Show ${Math.min(left, IMAGES_SHOWN)} more`;
    rest.replaceChildren(...(left > 0 ? [more] : []), error);
    document.getElementById("unlabeled-note").textContent = `Give some of them a class to make a dataset with those labels (${shown.toLocaleString("en-US")} of ${total.toLocaleString("en-US")} shown).`;
  };
  showMore();
}
