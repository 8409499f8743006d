// The experiments list's Compare ticks, kept for this tab across the list's pages (100
// experiments a page): experiments ticked on one page and on another are compared together,
// and a page opened again shows its own ticks. Ticks of experiments deleted since are
// forgotten: by the list, which asks after those of other pages, and by the compare page.
const KEY = "selftune-compare-ticks";

const load = () => {
  try {
    const ticks = JSON.parse(sessionStorage.getItem(KEY));
    return Array.isArray(ticks) ? ticks : [];
  } catch {
    return []; // storage off, or not ours to read
  }
};
const save = (ticks) => {
  try {
    sessionStorage.setItem(KEY, JSON.stringify(ticks));
  } catch {
    // storage off: the ticks of this page still go with the form
  }
};

export function carryTicks() {
  const form = document.getElementById("compare-form");
  const note = document.getElementById("ticked-elsewhere");
  if (!form || !note) return; // one experiment in all: nothing to compare it with
  const boxes = [...form.querySelectorAll("input[name=ids]")];
  const here = new Set(boxes.map((box) => box.value));
  let ticks = load(); // [{id, name}], in the order they were ticked

  const untick = document.createElement("button");
  untick.type = "button";
  untick.className = "secondary";
  untick.textContent = "Untick them";
  untick.addEventListener("click", () => {
    ticks = ticks.filter((tick) => here.has(tick.id));
    save(ticks);
    show();
  });
  function show() {
    const elsewhere = ticks.filter((tick) => !here.has(tick.id));
    note.hidden = elsewhere.length === 0;
    note.replaceChildren(...(elsewhere.length ? [
      `Also ticked on other pages: ${elsewhere.map((tick) => tick.name).join(", ")} `, untick] : []));
  }

  for (const box of boxes) {
    box.checked = ticks.some((tick) => tick.id === box.value);
    box.addEventListener("change", () => {
      ticks = ticks.filter((tick) => tick.id !== box.value);
      if (box.checked) ticks.push({ id: box.value, name: box.dataset.name });
      save(ticks);
      show();
    });
  }
  // Fewer than two ticked is said here, the ticks kept (the compare page's refusal was a bare
  // "Error 422" page); else the ticks of other pages go with this page's own.
  const refusal = Object.assign(document.createElement("p"), { className: "field-error", id: "compare-error" });
  refusal.setAttribute("role", "alert");
  refusal.hidden = true;
  document.getElementById("compare")?.parentNode.after(refusal);
  form.addEventListener("submit", (event) => {
    const chosen = boxes.filter((box) => box.checked).length + ticks.filter((tick) => !here.has(tick.id)).length;
    refusal.hidden = chosen >= 2;
    if (chosen < 2) {
      event.preventDefault();
      refusal.textContent = `Tick ${chosen ? "one more experiment" : "two experiments or more"} to compare (2 to ${form.dataset.most}).`;
      return;
    }
    for (const tick of ticks.filter((tick) => !here.has(tick.id))) {
      const carried = Object.assign(document.createElement("input"), { type: "hidden", name: "ids", value: tick.id });
      form.append(carried);
    }
  });
  show();
  forgetDeleted(ticks.filter((tick) => !here.has(tick.id)).map((tick) => tick.id)).then((gone) => {
    if (!gone.length) return;
    ticks = ticks.filter((tick) => !gone.includes(tick.id));
    show();
  });
}

// Forget the ticks of `ids` (experiments the compare page found deleted).
export function forgetTicks(ids) {
  save(load().filter((tick) => !ids.includes(tick.id)));
}

// The ids of `ids` whose experiments are gone, forgotten; when the list cannot be read, none.
async function forgetDeleted(ids) {
  if (!ids.length) return [];
  const query = ids.map((id) => `ids=${encodeURIComponent(id)}`).join("&");
  let listed;
  try {
    const response = await fetch(`/api/experiments?${query}`);
    if (!response.ok) return [];
    listed = new Set((await response.json()).map((experiment) => String(experiment.id)));
  } catch {
    return []; // offline, or signed out: the ticks stay
  }
  const gone = ids.filter((id) => !listed.has(id));
  if (gone.length) forgetTicks(gone);
  return gone;
}
