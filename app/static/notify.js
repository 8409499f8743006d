// "Notify me when it ends": a desktop notification when the experiment or run a page follows
// ends, for a person gone on to other work while a sweep trains for hours. The browser asks
// once for leave to show this site's notifications. The wish lasts while the tab is open (a
// reload keeps it) and is used once; pressed again, it is taken back.
//
// Browsers offer notifications to secure pages only (https, or this machine's localhost):
// elsewhere the button stays hidden.

const available = () => window.isSecureContext && "Notification" in window;

// `button`: a toggle (aria-pressed); `note`: where a refusal is said; `key`: what the wish
// is kept under in the tab. `update(going)` shows the button while there is something to wait
// for; `ended(title, body)` notifies once, if wished.
export function endNotice(button, note, key) {
  let wished = available() && sessionStorage.getItem(key) === "1"
    && Notification.permission === "granted";
  let going = false;
  const draw = () => {
    button.hidden = !available() || !going;
    button.setAttribute("aria-pressed", String(wished));
    button.textContent = wished ? "You will be notified when it ends" : "Notify me when it ends";
  };
  const wish = (value) => {
    wished = value;
    if (value) sessionStorage.setItem(key, "1");
    else sessionStorage.removeItem(key);
    draw();
  };
  button.addEventListener("click", async () => {
    note.textContent = "";
    if (wished) return wish(false);
    const permission = Notification.permission === "default"
      ? await Notification.requestPermission() : Notification.permission;
    if (permission !== "granted") {
      note.textContent = "The browser does not let this site notify you: allow its notifications "
        + "in the site's settings (the icon left of the address).";
      return;
    }
    wish(true);
  });
  draw();
  return {
    update(now) {
      going = now;
      draw();
    },
    ended(title, body) {
      if (!wished || Notification.permission !== "granted") return;
      wish(false);
      const shown = new Notification(title, { body, tag: key });
      shown.onclick = () => {
        window.focus();
        shown.close();
      };
    },
  };
}
