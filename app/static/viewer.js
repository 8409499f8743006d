// Images opened larger on the page: a thumbnail's link (a.enlarge) opens its image at 512 px in
// a dialog, where ← and → go through the thumbnails around it and Escape closes. An image to
// label (under a run's Label next) brings its class choice along: the dialog's choice sets the
// one under its thumbnail, and a digit key chooses that class and goes on to the next image
// (past the last one shown, into those its "Show more" shows). Over 10 classes, no digit for
// each, a class is found by typing its name instead: Enter chooses the one class found and goes
// on.
// A modified click (a new tab, a download) is left to the browser.

let viewer = null; // built on first use
const DIGITS = [..."1234567890"];

// The classes `typed` finds: those named so (as typed, else in any case), else those whose
// name starts so, else those whose name holds it.
function classesFound(classes, typed) {
  const wanted = typed.trim();
  if (!wanted) return [];
  const folded = wanted.toLocaleLowerCase();
  const tests = [(name) => name === wanted, (name) => name.toLocaleLowerCase() === folded,
    (name) => name.toLocaleLowerCase().startsWith(folded), (name) => name.toLocaleLowerCase().includes(folded)];
  for (const test of tests) {
    const found = classes.filter(test);
    if (found.length) return found;
  }
  return [];
}

const MOST_NAMED = 5; // classes a finder's note names, of those found
const TOUCH = window.matchMedia("(hover: none) and (pointer: coarse)");

function build() {
  const make = (tag, props = {}, ...children) => {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  };
  const image = make("img", { id: "viewer-image" });
  const caption = make("p", { id: "viewer-caption" });
  const choiceBox = make("p", { id: "viewer-choice" });
  const position = make("span", { className: "muted", id: "viewer-position" });
  const previous = make("button", { type: "button", className: "secondary", id: "viewer-previous" }, "‹ Previous");
  const next = make("button", { type: "button", className: "secondary", id: "viewer-next" }, "Next ›");
  const close = make("button", { type: "button", id: "viewer-close" }, "Close");
  const finder = make("input", { type: "text", id: "viewer-find", autocomplete: "off", spellcheck: false });
  finder.setAttribute("aria-label", "Find a class by name, Enter to choose it and go on");
  finder.setAttribute("aria-describedby", "viewer-find-note");
  const finderNote = make("small", { className: "muted", id: "viewer-find-note" });
  finderNote.setAttribute("aria-live", "polite");
  const finderBox = make("span", { className: "viewer-find" },
    make("label", { htmlFor: "viewer-find" }, " or type one: "), finder, finderNote);
  const dialog = make("dialog", { id: "image-viewer" }, image, caption, choiceBox,
    make("p", { className: "viewer-nav" }, previous, position, next, close));
  dialog.setAttribute("aria-label", "Image, larger");
  document.body.append(dialog);

  const state = { group: document, links: [], index: 0, keys: [], classes: [], waiting: false };
  const choiceOf = (link) => link.closest("figure")?.querySelector("select.give-label") ?? null;
  // A group's "Show more" button (data-more), where it has more thumbnails to show.
  const moreButton = () => [...state.group.querySelectorAll("button[data-more]")]
    .find((button) => !button.hidden && !button.closest("[hidden]")) ?? null;
  function show(index) {
    state.index = index;
    const link = state.links[index];
    const thumbnail = link.querySelector("img");
    image.src = link.href;
    image.alt = thumbnail?.alt ?? "";
    const figure = link.closest("figure");
    caption.textContent = figure?.title || thumbnail?.alt || "";
    position.textContent = `${index + 1} of ${state.links.length}`;
    previous.disabled = index === 0;
    next.disabled = index === state.links.length - 1 && !moreButton();
    if (dialog.open && (document.activeElement === document.body || document.activeElement?.disabled)) {
      (next.disabled ? close : next).focus(); // the button pressed was the last
    }
    const choice = choiceOf(link);
    const finding = document.activeElement === finder;
    if (!choice) {
      state.keys = state.classes = [];
      choiceBox.replaceChildren();
      return;
    }
    // A copy of the choice under the thumbnail, kept in step with it.
    const copy = choice.cloneNode(true);
    copy.value = choice.value;
    copy.id = "viewer-label";
    copy.setAttribute("aria-label", "Label of this image");
    copy.addEventListener("change", () => {
      choice.value = copy.value;
      choice.dispatchEvent(new Event("change"));
    });
    // Keys 1 to 9, then 0, for up to 10 classes (as a keyboard's top row reads); over that,
    // the finder.
    const classes = [...choice.options].map((option) => option.value).filter(Boolean);
    state.keys = classes.length <= DIGITS.length ? classes : [];
    state.classes = classes;
    finder.value = "";
    findNote();
    choiceBox.replaceChildren(copy, state.keys.length ? make("small", { className: "muted viewer-keys" },
      `Keys: ${classes.map((name, i) => `${DIGITS[i]}\u00a0${name}`).join(", ")} (and on to the next)`)
      : finderBox);
    if (finding) finder.focus(); // put back in place, it lost the keyboard
  }
  function findNote() {
    const found = classesFound(state.classes, finder.value);
    const named = found.slice(0, MOST_NAMED).join(", ") + (found.length > MOST_NAMED ? ", …" : "");
    finderNote.textContent = !finder.value.trim() ? "Enter chooses the one class found, and goes on"
      : found.length === 0 ? `No class has “${finder.value.trim()}”`
        : found.length === 1 ? `Enter: ${found[0]}, and on to the next`
          : `${found.length} classes: ${named}; type more`;
  }
  finder.addEventListener("input", findNote);
  finder.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || state.waiting) return;
    event.preventDefault();
    const found = classesFound(state.classes, finder.value);
    if (found.length !== 1) return; // the note says why
    const copy = choiceBox.querySelector("select");
    copy.value = found[0];
    copy.dispatchEvent(new Event("change"));
    go(1);
  });
  const linksNow = () => [...state.group.querySelectorAll("a.enlarge")];
  // Past the last image shown, "Show more" is pressed, and the images it adds (at once, or
  // once the server sends them) are waited for, 10 s at most.
  const shownMore = (before) => new Promise((resolve) => {
    if (!moreButton()?.disabled) moreButton()?.click(); // disabled: already asked
    const grew = () => linksNow().length > before;
    if (grew()) return resolve();
    const watching = new MutationObserver(() => grew() && done());
    const timer = setTimeout(() => done(), 10000);
    function done() {
      watching.disconnect();
      clearTimeout(timer);
      resolve();
    }
    watching.observe(state.group, { childList: true, subtree: true });
  });
  // While the next images are on their way, a key or click is not taken: a digit would
  // give the image just labeled a second class.
  const go = async (step) => {
    if (state.waiting) return;
    const index = state.index + step;
    if (index === state.links.length && moreButton()) {
      state.waiting = true;
      await shownMore(state.links.length);
      state.waiting = false;
      state.links = linksNow();
    }
    if (index >= 0 && index < state.links.length && dialog.open) show(index);
  };
  previous.addEventListener("click", () => go(-1));
  next.addEventListener("click", () => go(1));
  close.addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => {
    image.removeAttribute("src");
    choiceBox.replaceChildren();
    state.links[state.index]?.focus(); // back where the person left off
  });
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close(); // a click beside the box
  });
  dialog.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.target.tagName === "SELECT") return; // its arrows change the class
    // The finder's arrows move in what is typed; with nothing typed, they go on.
    if (event.target === finder && finder.value !== "") return;
    if (state.waiting && (event.key.startsWith("Arrow") || DIGITS.includes(event.key))) {
      event.preventDefault();
      return;
    }
    if (event.key === "ArrowLeft") go(-1);
    else if (event.key === "ArrowRight") go(1);
    else if (state.keys[DIGITS.indexOf(event.key)] !== undefined) {
      const copy = choiceBox.querySelector("select");
      copy.value = state.keys[DIGITS.indexOf(event.key)];
      copy.dispatchEvent(new Event("change"));
      go(1);
    } else return;
    event.preventDefault();
  });
  // Opens on `link`, among the thumbnails around it (its .thumbs box).
  const open = (link) => {
    state.group = link.closest(".thumbs") ?? document;
    state.links = linksNow();
    show(state.links.indexOf(link));
    if (!dialog.open) dialog.showModal();
    // The finder, to type in at once; not on a touch screen, where it would open a keyboard
    // over the image.
    (finder.isConnected && !TOUCH.matches ? finder : next.disabled ? close : next).focus();
  };
  return { open };
}

document.addEventListener("click", (event) => {
  const link = event.target.closest?.("a.enlarge");
  if (!link || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
  event.preventDefault();
  viewer ??= build();
  viewer.open(link);
});
