// Times come from the server in UTC (and say so); show them in the reader's own time zone,
// keeping the UTC time in the tooltip.
const pad = (n) => String(n).padStart(2, "0");

// "2026-12-03 14:05" in the reader's time zone, or null for what is not a time.
export function localTime(value) {
  const when = new Date(value);
  if (Number.isNaN(when.getTime())) return null;
  return `${when.getFullYear()}-${pad(when.getMonth() + 1)}-${pad(when.getDate())} ` +
    `${pad(when.getHours())}:${pad(when.getMinutes())}`;
}

// Each server time under `root` in the reader's time zone (a page's own as it loads; a part
// of it read again, /static/read_again.js, before it is put in).
export function showLocalTimes(root) {
  for (const node of root.querySelectorAll("time[datetime]")) {
    const local = localTime(node.getAttribute("datetime"));
    if (local === null) continue;
    node.title = node.textContent;
    node.textContent = local;
  }
}

showLocalTimes(document);
