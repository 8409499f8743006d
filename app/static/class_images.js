// The dataset page's training images of each class: the page shows the first few of each
// (app.routers.dataset_pages); "Show more" reads the rest from the API, a page at a time, so
// every image of a class can be looked at (an odd format, a mislabeled one) on the page.
import { count, failure, getJSON, h } from "/static/charts.js";

const PAGE = 48; // images a click adds

function thumbnail(datasetId, image) {
  const src = `/api/datasets/${datasetId}/images/${image.id}/thumbnail`;
  return h("a", { class: "enlarge", href: `${src}?size=512`, target: "_blank", rel: "noopener" },
    h("img", { loading: "lazy", width: 72, height: 72, alt: image.original_path.split("/").at(-1), src }));
}

export function moreClassImages(datasetId) {
  for (const box of document.querySelectorAll("#class-thumbnails .thumbs[data-class]")) {
    const total = Number(box.dataset.train);
    const shownNote = document.getElementById(`class-${box.dataset.class}`).querySelector("[data-shown]");
    if (box.children.length >= total) continue;
    const error = h("p", { class: "error", role: "alert" });
    const more = h("button", { type: "button", class: "secondary", "data-more-class": box.dataset.class });
    const say = () => {
      const left = total - box.children.length;
      more.textContent = `Show ${count(Math.min(left, PAGE))} more (${count(left)} not shown)`;
      more.hidden = left <= 0;
      if (shownNote) shownNote.textContent = left > 0 ? `: the first ${count(box.children.length)}` : "";
    };
    more.addEventListener("click", async () => {
      more.disabled = true;
      error.replaceChildren();
      try {
        const params = new URLSearchParams({ label: box.dataset.class, split: "train", offset: box.children.length, limit: PAGE });
        const page = await getJSON(`/api/datasets/${datasetId}/images?${params}`);
        box.append(...page.items.map((image) => thumbnail(datasetId, image)));
        box.children[box.children.length - page.items.length]?.focus();
      } catch (problem) {
        error.replaceChildren(...failure("Could not read more images", problem));
      }
      more.disabled = false;
      say();
    });
    say();
    box.after(h("p", {}, more), error);
  }
}
