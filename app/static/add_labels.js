// Add labels, on a dataset's page: the chosen CSV goes to POST /api/datasets/{id}/labels, and
// the page of the new dataset it makes opens; a refusal shows under the form, which keeps
// the file and the name for another try.
import { failure, getJSON } from "/static/charts.js";

export function labelAdder(url) {
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
      const dataset = await getJSON(url, { method: "POST", body: new FormData(form) });
      location.assign(`/datasets/${dataset.id}`);
    } catch (problem) {
      refuse(failure("Could not add the labels", problem));
      send.disabled = false;
    }
  });
}
