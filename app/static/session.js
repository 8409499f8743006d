// The sign-in shared by this browser's tabs: signing out in one tells the others at once, so
// their live feeds stop instead of running on (an open stream outlives its cookie) or
// retrying for ever; a page that shows "Sign out" tells them it is signed in again.
const channel = typeof BroadcastChannel === "function" ? new BroadcastChannel("selftune-session") : null;
const listeners = { "signed-out": [], "signed-in": [] };

// onSession({signedOut, signedIn}): called when another tab signs out or in.
export function onSession({ signedOut, signedIn }) {
  if (signedOut) listeners["signed-out"].push(signedOut);
  if (signedIn) listeners["signed-in"].push(signedIn);
}

if (channel) {
  channel.addEventListener("message", ({ data }) => {
    for (const listener of listeners[data?.type] ?? []) listener();
    // This tab is signed out too: its own "Sign out" would do nothing until a sign-in.
    for (const form of document.querySelectorAll("form.signout")) form.hidden = data?.type === "signed-out";
  });
  const signOut = document.querySelector("form.signout");
  if (signOut) {
    signOut.addEventListener("submit", () => channel.postMessage({ type: "signed-out" }));
    channel.postMessage({ type: "signed-in" });
  }
}
