// Add labels, on a dataset's page (and under a run's Label next): the chosen CSV goes to POST
// /api/datasets/{id}/labels, and the page of the new dataset it makes opens; a refusal shows
// under the form, which keeps the file and the name for another try.
import { failure, getJSON } from "/static/charts.js";

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
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (send.disabled) return;
    if (!form.elements.file.files.length) {
      refuse(["Choose the CSV file of labels first."]);
      form.elements.file.focus();
      return;
    }
    send.disabled = true;
    error.hidden = true;
    try {
      await makeLabeledDataset(datasetId, new FormData(form), key);
    } catch (problem) {
      refuse(failure("Could not add the labels", problem));
      send.disabled = false;
    }
  });
}
