// Winslow viewer: the only script. It follows a running log (server-sent events) and sorts tables.
"use strict";

function followLog(pre) {
  const source = new EventSource(pre.dataset.stream);
  const atBottom = () => pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
  const show = (text, replace) => {
    const stick = atBottom();
    if (replace) { pre.textContent = text; } else { pre.textContent += text; }
    if (stick) { pre.scrollTop = pre.scrollHeight; }
  };
  source.addEventListener("reset", (e) => show(JSON.parse(e.data).text, true));
  source.addEventListener("append", (e) => show(JSON.parse(e.data).text, false));
  source.addEventListener("end", (e) => {
    const end = JSON.parse(e.data);
    source.close();
    show(end.text, true);
    pre.dataset.ended = end.state || "gone";
    const badge = document.getElementById("run-state");
    if (badge && end.state) {
      badge.textContent = end.state;
      badge.className = "state state-" + end.state.toLowerCase();
    }
    const exit = document.getElementById("run-exit");
    if (exit && end.exit_code !== undefined && end.exit_code !== null) { exit.textContent = String(end.exit_code); }
    const where = document.getElementById("log-source");
    if (where) { where.textContent = "final log on main"; }
  });
}

function cellValue(row, index) {
  const cell = row.cells[index];
  if (!cell) { return ""; }
  return cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.trim();
}

function sortBy(table, header, index) {
  const body = table.tBodies[0];
  if (!body) { return; }
  const ascending = header.getAttribute("aria-sort") !== "ascending";
  for (const th of table.tHead.rows[0].cells) { th.removeAttribute("aria-sort"); }
  header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const rows = Array.from(body.rows);
  const numeric = header.dataset.type === "number" ||
    rows.every((r) => cellValue(r, index) === "" || !isNaN(Number(cellValue(r, index))));
  rows.sort((a, b) => {
    const x = cellValue(a, index), y = cellValue(b, index);
    const order = numeric ? (Number(x) - Number(y)) : x.localeCompare(y, undefined, { numeric: true });
    return ascending ? order : -order;
  });
  for (const row of rows) { body.appendChild(row); }
}

document.addEventListener("DOMContentLoaded", () => {
  const pre = document.getElementById("log");
  if (pre && pre.dataset.stream) { followLog(pre); }
  for (const table of document.querySelectorAll("table.sortable")) {
    if (!table.tHead) { continue; }
    Array.from(table.tHead.rows[0].cells).forEach((th, index) => {
      th.addEventListener("click", () => sortBy(table, th, index));
      th.title = "sort";
    });
  }
});
