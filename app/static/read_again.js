import { showLocalTimes } from "/static/times.js";

// A page that lists what the database holds (the datasets, the experiments, the system's
// status, experiments compared) shown again by Back or Forward from the browser's
// back/forward cache is the page as it was left: an item deleted since, on the page it was
// left for (Delete, then the list) or elsewhere, is still listed, with its link to a page
// that is gone, and results are as they were. It is read again.
window.addEventListener("pageshow", (event) => {
  if (event.persisted) window.location.reload();
});

// While an experiment a page shows has runs to go (its part is marked data-going), the page
// reads itself again every few seconds and puts in each of its changing parts (data-live,
// found by id) the ones that changed: statuses, runs by status, times left, best models,
// results compared. Read once, the home page and the experiments list said "running" long
// after the sweep had finished. A "read-again" event on the document then names the parts
// put in (`detail.replaced`, their ids), for a page that draws from them. A part that holds
// the keyboard waits for the next read (put in anew, it would lose it); a read refused (signed
// out: the sign-in page) stops, as does a page with nothing to go.
const READ_EVERY_MS = 5000;

async function readAgain() {
  if (!document.querySelector("[data-going]")) return;
  if (!document.hidden) {
    try {
      const answer = await fetch(window.location.href, { cache: "no-store" });
      if (answer.redirected || answer.status === 401) return;
      if (answer.ok) { // else (a restart's 502, say) the next read may do
        const fresh = new DOMParser().parseFromString(await answer.text(), "text/html");
        showLocalTimes(fresh);
        const replaced = [];
        for (const part of document.querySelectorAll("[data-live][id]")) {
          const next = fresh.getElementById(part.id);
          if (next && next.outerHTML !== part.outerHTML && !part.contains(document.activeElement)) {
            part.replaceWith(document.importNode(next, true));
            replaced.push(part.id);
          }
        }
        if (replaced.length) document.dispatchEvent(new CustomEvent("read-again", { detail: { replaced } }));
      }
    } catch (error) {
      console.warn("could not read the page again:", error.message); // the next read may
    }
  }
  setTimeout(readAgain, READ_EVERY_MS);
}

setTimeout(readAgain, READ_EVERY_MS);
