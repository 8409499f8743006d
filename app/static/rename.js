// Renaming a dataset or an experiment where it is shown: Rename opens a one-field form under
// the title; Save sends the name (PATCH) and the page shows the one the server kept (its
// heading and the tab's title); Cancel or Escape closes it as it was.
import { failure, getJSON, tabTitle } from "/static/charts.js";

export function renamer(url, onRenamed = () => {}) {
  const button = document.getElementById("rename");
  const form = document.getElementById("rename-form");
  const input = form.elements.name;
  const error = form.querySelector(".field-error");
  const title = document.getElementById("title-name");

  function close() {
    form.hidden = true;
    button.hidden = false;
    error.hidden = true;
    button.focus();
  }
  button.addEventListener("click", () => {
    input.value = title.textContent;
    form.hidden = false;
    button.hidden = true;
    input.focus();
    input.select();
  });
  document.getElementById("rename-cancel").addEventListener("click", close);
  form.addEventListener("keydown", (event) => {
    if (event.key === "Escape") close();
  });

  const save = form.querySelector("button[type=submit]");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (save.disabled) return;
    save.disabled = true;
    error.hidden = true;
    try {
      const { name } = await getJSON(url, {
        method: "PATCH",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ name: input.value }),
      });
      title.textContent = name;
      tabTitle({ name });
      onRenamed(name);
      close();
    } catch (problem) {
      const detail = problem.body?.detail;
      error.replaceChildren(...(problem.status === 422 && Array.isArray(detail)
        ? [`The name ${detail.map((d) => d.msg).join("; ")}.`]
        : failure("Could not rename", problem)));
      error.hidden = false;
      input.focus();
    } finally {
      save.disabled = false;
    }
  });
}
