// Add labels, on a dataset's page (and under a run's Label next): the chosen CSV goes to POST
// /api/datasets/{id}/labels, and the page of the new dataset it makes opens; a refusal shows
// under the form, which keeps the file and the name for another try.
import { failure, getJSON } from "/static/charts.js";

// Sends a form with a labels CSV (`file`) and opens the dataset it makes; a refusal rejects.
export async function makeLabeledDataset(datasetId, body) {
  const dataset = await getJSON(`/api/datasets/${datasetId}/labels`, { method: "POST", body });
  location.assign(`/datasets/${dataset.id}`);
}

export function labelAdder(datasetId) {
  const form = document.getElementById("add-labels-form");
  if (!form) return; // a dataset without unlabeled images has nothing to label
  const error = form.querySelector(".field-error");
  const send = form.querySelector("button[type=submit]");
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
      await makeLabeledDataset(datasetId, new FormData(form));
    } catch (problem) {
      refuse(failure("Could not add the labels", problem));
      send.disabled = false;
    }
  });
}
