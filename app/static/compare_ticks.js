// The experiments list's Compare ticks, kept for this tab across the list's pages (100
// experiments a page): experiments ticked on one page and on another are compared together,
// and a page opened again shows its own ticks.
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
  // The ticks of other pages go with this page's own.
  form.addEventListener("submit", () => {
    for (const tick of ticks.filter((tick) => !here.has(tick.id))) {
      const carried = Object.assign(document.createElement("input"), { type: "hidden", name: "ids", value: tick.id });
      form.append(carried);
    }
  });
  show();
}
