// A page that lists what the database holds (the datasets, the experiments, the system's
// status, experiments compared) shown again by Back or Forward from the browser's
// back/forward cache is the page as it was left: an item deleted since, on the page it was
// left for (Delete, then the list) or elsewhere, is still listed, with its link to a page
// that is gone, and results are as they were. It is read again.
window.addEventListener("pageshow", (event) => {
  if (event.persisted) window.location.reload();
});
