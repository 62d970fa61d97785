"""`report.html`: one self-contained page to browse a run's images, maps, classes, scores and boxes.

The page holds its CSS, its script and the run's data inline and refers to the
overlay images beside it by relative path, so it opens from the file system with
no server and no network: copy the folder, open the page.  It shows a thumbnail
card per image (overlay, top class, score, box), filters by class, by error and by
name, sorts by score, and pages through the images (only the current page is in
the document, so 10,000 images stay fast); a card opens the image at full size
with the maps of every class explained (one overlay per class) and, for
``camcore compare``, every method, with the boxes; the header sums up the run:
model, method, counts, time per image and, when computed, faithfulness scores.

`report_data` reads what ``camcore explain`` (``results.json``) and ``camcore
compare`` (``compare.json``) wrote into an output folder; `write_report` writes
the page there.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from .errors import InvalidInput

__all__ = ["report_data", "render_report", "write_report"]


def _class_rows(classes, boxes=None) -> list:
    rows = []
    for j, c in enumerate(classes):
        box = c.get("box") if boxes is None else boxes
        rows.append([int(c["index"]), str(c.get("name", c["index"])),
                     None if c.get("score") is None else float(c["score"]),
                     None if box is None else [int(v) for v in box]])
    return rows


def report_data(out) -> dict:
    """The report's data from an output folder: its ``results.json`` and/or ``compare.json``.

    Returns
    -------
    dict
        ``title``, ``summary`` (model, method(s), threshold, counts, time per image,
        faithfulness) and ``items``: per image its path, size, error, classes
        ``[index, name, score, box]``, thumbnail and full-size views ``[label, file]``.

    Raises
    ------
    InvalidInput
        When the folder holds neither file, or one is not what camcore writes.
    """
    out = Path(out)
    results, compared = out / "results.json", out / "compare.json"
    if not results.is_file() and not compared.is_file():
        raise InvalidInput(f"{out} holds no results.json or compare.json: run camcore explain or compare --out {out}")
    items, summary = {}, {}
    order = []
    if results.is_file():
        doc = _read_json(results)
        summary.update({k: doc.get(k) for k in ("model", "method", "threshold", "seconds_per_image",
                                                 "faithfulness", "targets") if doc.get(k) is not None})
        for r in doc["images"]:
            item = {"p": r["path"], "w": r.get("width"), "h": r.get("height"), "e": r.get("error"),
                    "c": _class_rows(r.get("classes") or []), "o": r.get("overlay"), "v": [], "m": r.get("maps")}
            if r.get("overlay"):
                item["v"].append(["classes", r["overlay"]])
            items[r["path"]] = item
            order.append(r["path"])
    if compared.is_file():
        doc = _read_json(compared)
        summary.setdefault("model", doc.get("model"))
        summary["methods"] = doc.get("methods")
        summary["seconds_per_image"] = doc.get("seconds_per_image") or summary.get("seconds_per_image")
        if doc.get("faithfulness"):
            summary["faithfulness"] = doc["faithfulness"]
        for r in doc["images"]:
            item = items.get(r["path"])
            if item is None:
                first = (doc.get("methods") or [None])[0]
                boxes = (r.get("boxes") or {}).get(first) or [None] * len(r.get("classes") or [])
                item = {"p": r["path"], "w": r.get("width"), "h": r.get("height"), "e": r.get("error"),
                        "c": [row[:3] + [b] for row, b in zip(_class_rows(r.get("classes") or []), boxes)],
                        "o": r.get("grid"), "v": []}
                items[r["path"]] = item
                order.append(r["path"])
            if r.get("grid"):
                item["v"].append(["methods: " + ", ".join(doc.get("methods") or []), r["grid"]])
            if r.get("boxes"):
                item["b"] = r["boxes"]
    rows = [items[p] for p in order]
    errors = sum(1 for r in rows if r["e"])
    summary.update({"images": len(rows), "explained": len(rows) - errors, "errors": errors})
    names = {}
    for r in rows:
        for index, name, _, _ in r["c"]:
            names[index] = name
    return {"title": f"camcore report: {out.resolve().name}", "summary": summary,
            "classes": sorted([i, n] for i, n in names.items()), "items": rows}


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise InvalidInput(f"{path} is not a camcore results file (no 'images' list)")
    return doc


def render_report(data: dict) -> str:
    """The page's HTML for `data` (`report_data`'s dict)."""
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
    # inside <script>: no "</script>" or "<!--" may appear in the data
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (_PAGE.replace("__TITLE__", html.escape(data.get("title", "camcore report")))
            .replace("__DATA__", payload))


def write_report(out, *, name: str = "report.html", summary: dict | None = None) -> Path:
    """Write ``report.html`` into the output folder `out`, atomically; returns its path.

    `summary` adds to the run's summary what its files do not hold (``seconds_per_image``,
    measured by the command that wrote them: results.json stays the same from run to run).
    """
    from .outputs import atomic_write_text

    out = Path(out)
    data = report_data(out)
    data["summary"].update({k: v for k, v in (summary or {}).items() if v is not None})
    return atomic_write_text(out / name, render_report(data))


_PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root { --bg: #f6f6f4; --fg: #1d1d1b; --muted: #6b6b66; --card: #fff; --line: #dddcd6; --accent: #b5400f; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg); color: var(--fg); }
header { padding: 12px 20px; background: #262624; color: #f4f3ee; }
header h1 { margin: 0 0 6px; font-size: 18px; font-weight: 600; }
#summary { display: flex; flex-wrap: wrap; gap: 6px 18px; font-size: 13px; color: #d6d4cc; }
#summary b { color: #fff; font-weight: 600; }
#faith { margin-top: 6px; font-size: 12px; border-collapse: collapse; color: #d6d4cc; }
#faith td, #faith th { padding: 1px 10px 1px 0; text-align: right; font-weight: normal; }
#faith th:first-child, #faith td:first-child { text-align: left; }
#controls { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center;
  padding: 8px 20px; background: var(--bg); border-bottom: 1px solid var(--line); }
#controls label { color: var(--muted); }
select, input, button { font: inherit; padding: 3px 6px; border: 1px solid var(--line); border-radius: 4px; background: #fff; }
button { cursor: pointer; }
button:disabled { cursor: default; opacity: .4; }
#pager { margin-left: auto; display: flex; gap: 6px; align-items: center; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 12px; padding: 14px 20px 30px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px; overflow: hidden; cursor: pointer; }
.card:hover { border-color: var(--accent); }
.card .thumb { width: 100%; height: 170px; object-fit: contain; background: #202020; display: block; }
.card .noimg { height: 170px; display: flex; align-items: center; justify-content: center; padding: 10px;
  background: #f3e3dc; color: #8a2b06; font-size: 12px; text-align: center; overflow: hidden; }
.card .meta { padding: 6px 8px; }
.card .name { font-size: 12px; color: var(--muted); white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.card .cls { font-weight: 600; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.card .score { float: right; font-variant-numeric: tabular-nums; color: var(--accent); font-weight: 600; }
.card .box { font-size: 11px; color: var(--muted); font-variant-numeric: tabular-nums; }
.card.error .cls { color: #8a2b06; }
#empty { padding: 40px 20px; color: var(--muted); display: none; }
#detail { position: fixed; inset: 0; z-index: 5; background: rgba(20, 20, 18, .92); color: #eee; overflow: auto; display: none; }
#detail.open { display: block; }
#detail .bar { position: sticky; top: 0; display: flex; gap: 10px; align-items: center; padding: 8px 16px; background: #1a1a18; }
#detail .bar .title { flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
#detail figure { margin: 14px 16px; }
#detail figure img { max-width: 100%; height: auto; display: block; background: #000; }
#detail figcaption { color: #bbb; margin: 4px 0; font-size: 12px; }
#detail table { margin: 10px 16px; border-collapse: collapse; font-variant-numeric: tabular-nums; }
#detail td, #detail th { padding: 3px 12px 3px 0; text-align: left; border-bottom: 1px solid #333; }
#detail .err { margin: 16px; color: #ffb59a; }
</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <div id="summary"></div>
  <table id="faith"></table>
</header>
<div id="controls">
  <label>class <select id="class"><option value="">all classes</option></select></label>
  <label>status <select id="status">
    <option value="all">all images</option><option value="ok">explained</option><option value="error">errors</option>
  </select></label>
  <label>sort <select id="sort">
    <option value="input">input order</option><option value="score-desc">score, high first</option>
    <option value="score-asc">score, low first</option><option value="name">name</option>
  </select></label>
  <label>name <input id="search" type="search" placeholder="filter by path" size="16"></label>
  <label>per page <select id="size"><option>24</option><option selected>48</option><option>96</option><option>192</option></select></label>
  <div id="pager"><button id="prev" title="previous page (left arrow)">&#8592;</button><span id="range"></span>
    <button id="next" title="next page (right arrow)">&#8594;</button></div>
</div>
<div id="grid"></div>
<div id="empty">No image matches.</div>
<div id="detail" role="dialog" aria-modal="true">
  <div class="bar"><button id="dprev">&#8592;</button><button id="dnext">&#8594;</button>
    <span class="title" id="dtitle"></span><button id="dclose">close (Esc)</button></div>
  <div id="dbody"></div>
</div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const S = { cls: "", status: "all", sort: "input", q: "", page: 0, size: 48 };
let shown = D.items.map((_, i) => i), current = -1;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}
function pct(s) { return s === null || s === undefined ? "" : (100 * s).toFixed(1) + "%"; }
function boxText(b) { return b ? "box " + b.join(" ") : "no box"; }
function url(p) { return String(p).split("/").map(encodeURIComponent).join("/"); }  // a relative file name
function base(p) { return String(p).split(/[\\/]/).pop(); }
function entry(it) {  // the class the card shows: the filtered class, else the first
  if (!it.c.length) return null;
  if (S.cls !== "") { for (const c of it.c) if (String(c[0]) === S.cls) return c; }
  return it.c[0];
}
function score(it) { const c = entry(it); return c && c[2] !== null ? c[2] : -1; }

function summary() {
  $("title").textContent = D.title;
  const s = D.summary, parts = [];
  const add = (k, v) => { if (v !== undefined && v !== null && v !== "") parts.push([k, v]); };
  add("model", s.model); add("method", s.method || (s.methods || []).join(", "));
  add("images", s.images); add("explained", s.explained); add("errors", s.errors);
  add("box threshold", s.threshold); add("targets", s.targets);
  const t = s.seconds_per_image;
  if (typeof t === "number") add("time per image", (1000 * t).toFixed(1) + " ms");
  const box = $("summary");
  for (const [k, v] of parts) { const span = el("span", "", k + " "); span.appendChild(el("b", "", String(v))); box.appendChild(span); }
  const f = s.faithfulness, table = $("faith");
  const methods = f ? Object.keys(f) : (t && typeof t === "object" ? Object.keys(t) : []);
  if (methods.length) {
    const head = el("tr");
    for (const h of ["method", "time per image", "average drop %", "increase in confidence %", "deletion AUC", "insertion AUC"])
      head.appendChild(el("th", "", h));
    table.appendChild(head);
    for (const m of methods) {
      const row = el("tr"), g = (f && f[m]) || {}, fmt = (v, d) => (v === undefined || v === null ? "" : Number(v).toFixed(d));
      const ms = t && typeof t === "object" && t[m] !== undefined ? (1000 * t[m]).toFixed(1) + " ms" : "";
      for (const v of [m, ms, fmt(g.average_drop, 2), fmt(g.increase_in_confidence, 1), fmt(g.deletion_auc, 4), fmt(g.insertion_auc, 4)])
        row.appendChild(el("td", "", v));
      table.appendChild(row);
    }
  }
  const counts = new Map();
  for (const it of D.items) for (const c of it.c) counts.set(c[0], (counts.get(c[0]) || 0) + 1);
  for (const [index, name] of D.classes) {
    const o = el("option", "", name + " (" + index + ") \u00b7 " + (counts.get(index) || 0));
    o.value = String(index);
    $("class").appendChild(o);
  }
}

function select() {  // filter, then sort: the indices of the matching items
  const q = S.q.toLowerCase();
  shown = [];
  D.items.forEach((it, i) => {
    if (S.status === "ok" && it.e) return;
    if (S.status === "error" && !it.e) return;
    if (S.cls !== "" && !it.c.some((c) => String(c[0]) === S.cls)) return;
    if (q && String(it.p).toLowerCase().indexOf(q) < 0) return;
    shown.push(i);
  });
  if (S.sort === "score-desc" || S.sort === "score-asc") {
    const key = new Map(shown.map((i) => [i, score(D.items[i])])), sign = S.sort === "score-desc" ? -1 : 1;
    shown.sort((a, b) => sign * (key.get(a) - key.get(b)) || a - b);
  } else if (S.sort === "name") {
    shown.sort((a, b) => String(D.items[a].p).localeCompare(String(D.items[b].p)) || a - b);
  }
  S.page = 0;
}

function card(i) {
  const it = D.items[i], c = entry(it), div = el("div", "card" + (it.e ? " error" : ""));
  div.dataset.index = i;
  if (it.o) {
    const img = el("img", "thumb");
    img.loading = "lazy"; img.decoding = "async"; img.alt = base(it.p); img.src = url(it.o);
    div.appendChild(img);
  } else {
    div.appendChild(el("div", "noimg", it.e || "no overlay"));
  }
  const meta = el("div", "meta");
  meta.appendChild(el("div", "name", base(it.p)));
  const cls = el("div", "cls");
  if (c) {
    const s = el("span", "score", pct(c[2]));
    s.dataset.score = c[2] === null ? "" : String(c[2]);
    cls.appendChild(s);
    cls.appendChild(document.createTextNode(c[1]));
  } else {
    cls.textContent = it.e ? "error" : "no class";
  }
  meta.appendChild(cls);
  meta.appendChild(el("div", "box", c ? boxText(c[3]) + (it.c.length > 1 ? " \u00b7 " + it.c.length + " classes" : "") : ""));
  div.appendChild(meta);
  div.addEventListener("click", () => openDetail(i));
  return div;
}

function render() {
  const grid = $("grid"), pages = Math.max(1, Math.ceil(shown.length / S.size));
  S.page = Math.min(Math.max(S.page, 0), pages - 1);
  const start = S.page * S.size, stop = Math.min(shown.length, start + S.size);
  const frag = document.createDocumentFragment();
  for (let k = start; k < stop; k++) frag.appendChild(card(shown[k]));
  grid.replaceChildren(frag);  // only this page's cards are in the document
  $("range").textContent = shown.length ? (start + 1) + "\u2013" + stop + " of " + shown.length : "0 of 0";
  $("prev").disabled = S.page === 0;
  $("next").disabled = S.page >= pages - 1;
  $("empty").style.display = shown.length ? "none" : "block";
  window.scrollTo(0, 0);
}

function openDetail(i) {
  current = i;
  const it = D.items[i], body = $("dbody");
  $("dtitle").textContent = it.p + (it.w ? "  (" + it.w + " \u00d7 " + it.h + ")" : "");
  body.replaceChildren();
  if (it.e) body.appendChild(el("div", "err", it.e));
  for (const [label, src] of it.v) {
    const fig = el("figure"), img = el("img");
    img.src = url(src); img.alt = label;
    fig.appendChild(el("figcaption", "", label));
    fig.appendChild(img);
    body.appendChild(fig);
  }
  if (it.c.length) {
    const table = el("table"), head = el("tr");
    const methods = it.b ? Object.keys(it.b) : [];
    for (const h of ["class", "index", "score", "box"].concat(methods.map((m) => "box " + m))) head.appendChild(el("th", "", h));
    table.appendChild(head);
    it.c.forEach((c, j) => {
      const row = el("tr");
      for (const v of [c[1], c[0], pct(c[2]), c[3] ? c[3].join(" ") : "none"]) row.appendChild(el("td", "", String(v)));
      for (const m of methods) { const b = it.b[m][j]; row.appendChild(el("td", "", b ? b.join(" ") : "none")); }
      table.appendChild(row);
    });
    body.appendChild(table);
  }
  if (it.m) body.appendChild(el("div", "", "raw maps: " + it.m));
  $("detail").classList.add("open");
}
function closeDetail() { $("detail").classList.remove("open"); current = -1; }
function step(d) {
  const k = shown.indexOf(current);
  if (k >= 0 && k + d >= 0 && k + d < shown.length) openDetail(shown[k + d]);
}

function changed(key, value) { S[key] = value; select(); render(); }
$("class").addEventListener("change", (e) => changed("cls", e.target.value));
$("status").addEventListener("change", (e) => changed("status", e.target.value));
$("sort").addEventListener("change", (e) => changed("sort", e.target.value));
$("search").addEventListener("input", (e) => changed("q", e.target.value));
$("size").addEventListener("change", (e) => { S.size = Number(e.target.value); render(); });
$("prev").addEventListener("click", () => { S.page--; render(); });
$("next").addEventListener("click", () => { S.page++; render(); });
$("dclose").addEventListener("click", closeDetail);
$("dprev").addEventListener("click", () => step(-1));
$("dnext").addEventListener("click", () => step(1));
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT") return;
  const inDetail = $("detail").classList.contains("open");
  if (e.key === "Escape" && inDetail) closeDetail();
  else if (e.key === "ArrowLeft") { if (inDetail) step(-1); else if (!$("prev").disabled) { S.page--; render(); } }
  else if (e.key === "ArrowRight") { if (inDetail) step(1); else if (!$("next").disabled) { S.page++; render(); } }
});
summary();
select();
render();
document.body.dataset.ready = "1";
</script>
</body>
</html>
"""
