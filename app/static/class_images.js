// The dataset page's images of each class: the page shows the first few training images of
// each (app.routers.dataset_pages); "Show more" reads the rest from the API, a page at a
// time, and "Show its test images" those the runs are scored on, so that every image of a
// class can be looked at (an odd format, a mislabeled one) on the page.
import { count, failure, getJSON, h } from "/static/charts.js";

const PAGE = 48; // images a click adds

function thumbnail(datasetId, image) {
  const src = `/api/datasets/${datasetId}/images/${image.id}/thumbnail`;
  return h("a", { class: "enlarge", href: `${src}?size=512`, target: "_blank", rel: "noopener" },
    h("img", { loading: "lazy", width: 72, height: 72, alt: image.original_path.split("/").at(-1), src }));
}

// A button that adds the next page of `box`'s images (of its class, in `split`) until all
// `total` are shown, and where its errors show. `words(next, left, shown)` is its text;
// `shownNow(left, shown)` runs after each page.
function pager(datasetId, box, label, split, total, attribute, words, shownNow) {
  const error = h("p", { class: "error", role: "alert" });
  const more = h("button", { type: "button", class: "secondary", [attribute]: label });
  const say = () => {
    const left = total - box.children.length;
    more.textContent = words(Math.min(left, PAGE), left, box.children.length);
    more.hidden = left <= 0;
    shownNow(left, box.children.length);
  };
  more.addEventListener("click", async () => {
    more.disabled = true;
    error.replaceChildren();
    try {
      const params = new URLSearchParams({ label, split, offset: box.children.length, limit: PAGE });
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
  return [h("p", {}, more), error];
}

export function moreClassImages(datasetId) {
  for (const box of document.querySelectorAll("#class-thumbnails .thumbs[data-class]")) {
    const label = box.dataset.class;
    const heading = document.getElementById(`class-${label}`);
    const shownNote = heading.querySelector("[data-shown]");
    const after = [];
    const train = Number(box.dataset.train);
    if (box.children.length < train) {
      after.push(...pager(datasetId, box, label, "train", train, "data-more-class",
        (next, left) => `Show ${count(next)} more (${count(left)} not shown)`,
        (left, shown) => {
          if (shownNote) shownNote.textContent = left > 0 ? `: the first ${count(shown)}` : "";
        }));
    }
    const test = Number(box.dataset.test);
    if (test > 0) {
      const name = heading.dataset.name;
      const title = h("h4", { hidden: true }, `Test images of ${name}`);
      const tests = h("div", { class: "thumbs", "data-test-of": label });
      after.push(title, tests, ...pager(datasetId, tests, label, "test", test, "data-more-test",
        (next, left, shown) => (shown ? `Show ${count(next)} more test images (${count(left)} not shown)`
          : test > next ? `Show the first ${count(next)} of its ${count(test)} test images`
          : `Show its ${count(test)} test image${test === 1 ? "" : "s"}`),
        (left, shown) => { title.hidden = shown === 0; }));
    }
    box.after(...after);
  }
}
