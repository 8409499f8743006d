// Images opened larger on the page: a thumbnail's link (a.enlarge) opens its image at 512 px in
// a dialog, where ← and → go through the thumbnails around it and Escape closes. An image to
// label (under a run's Label next) brings its class choice along: the dialog's choice sets the
// one under its thumbnail, and a digit key chooses that class and goes on to the next image.
// A modified click (a new tab, a download) is left to the browser.

let viewer = null; // built on first use

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

  const state = { links: [], index: 0, digits: false };
  const choiceOf = (link) => link.closest("figure")?.querySelector("select.give-label") ?? null;
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
    next.disabled = index === state.links.length - 1;
    if (dialog.open && (document.activeElement === document.body || document.activeElement?.disabled)) {
      (next.disabled ? close : next).focus(); // the button pressed was the last
    }
    const choice = choiceOf(link);
    state.digits = false;
    if (!choice) {
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
    const classes = [...choice.options].filter((option) => option.value);
    state.digits = classes.length <= 9;
    choiceBox.replaceChildren(copy, state.digits ? make("small", { className: "muted" },
      ` keys 1–${classes.length}: ${classes.map((option, i) => `${i + 1} ${option.value}`).join(", ")}, and on to the next`) : "");
  }
  const go = (step) => {
    const index = state.index + step;
    if (index >= 0 && index < state.links.length) show(index);
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
    if (event.key === "ArrowLeft") go(-1);
    else if (event.key === "ArrowRight") go(1);
    else if (state.digits && /^[1-9]$/.test(event.key)) {
      const copy = choiceBox.querySelector("select");
      const option = [...copy.options].filter((o) => o.value)[Number(event.key) - 1];
      if (!option) return;
      copy.value = option.value;
      copy.dispatchEvent(new Event("change"));
      go(1);
    } else return;
    event.preventDefault();
  });
  return { dialog, state, show };
}

document.addEventListener("click", (event) => {
  const link = event.target.closest?.("a.enlarge");
  if (!link || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
  event.preventDefault();
  viewer ??= build();
  const group = link.closest(".thumbs") ?? document;
  viewer.state.links = [...group.querySelectorAll("a.enlarge")];
  viewer.show(viewer.state.links.indexOf(link));
  if (!viewer.dialog.open) viewer.dialog.showModal();
  viewer.dialog.querySelector("#viewer-next:not(:disabled), #viewer-close").focus();
});
