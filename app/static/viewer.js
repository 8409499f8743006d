// Images opened larger on the page: a thumbnail's link (a.enlarge) opens its image at 512 px in
// a dialog, where ← and → go through the thumbnails around it and Escape closes. An image to
// label (under a run's Label next) brings its class choice along: the dialog's choice sets the
// one under its thumbnail, and a digit key chooses that class and goes on to the next image
// (past the last one shown, into those its "Show more" shows).
// A modified click (a new tab, a download) is left to the browser.

let viewer = null; // built on first use
const DIGITS = [..."1234567890"];

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
  const dialog = make("dialog", { id: "image-viewer" }, image, caption, choiceBox,
    make("p", { className: "viewer-nav" }, previous, position, next, close));
  dialog.setAttribute("aria-label", "Image, larger");
  document.body.append(dialog);

  const state = { group: document, links: [], index: 0, keys: [], waiting: false };
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
    if (!choice) {
      state.keys = [];
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
    // Keys 1 to 9, then 0, for up to 10 classes (as a keyboard's top row reads).
    const classes = [...choice.options].map((option) => option.value).filter(Boolean);
    state.keys = classes.length <= DIGITS.length ? classes : [];
    choiceBox.replaceChildren(copy, state.keys.length ? make("small", { className: "muted" },
      `Keys: ${classes.map((name, i) => `${DIGITS[i]}\u00a0${name}`).join(", ")} (and on to the next)`) : "");
  }
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
    (next.disabled ? close : next).focus();
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
