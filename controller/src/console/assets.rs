//! The console's style sheet and script, checked in as Rust constants (no
//! Node toolchain, no build step). Served from `/console.css` and
//! `/console.js` so the Content-Security-Policy can forbid every inline
//! script and style.

/// The style sheet: system fonts, a laptop-width layout, state colours that
/// pass WCAG AA contrast on white (text) and carry a word besides the colour.
pub const CSS: &str = r#"
:root { --fg:#1b1f24; --muted:#57606a; --line:#d0d7de; --bg:#ffffff; --panel:#f6f8fa;
  --ok:#116329; --warn:#7d4e00; --bad:#b3261e; --info:#0b57d0; --idle:#57606a; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg); background:var(--bg); }
a { color:var(--info); }
a:focus, button:focus, input:focus, select:focus { outline: 3px solid #ffbf47; outline-offset: 1px; }
header { display:flex; align-items:center; gap:1.5rem; padding:.5rem 1.25rem; background:#24292f; color:#fff; flex-wrap:wrap; }
header a { color:#fff; text-decoration:none; padding:.25rem .5rem; border-radius:4px; }
header a[aria-current="page"] { background:#57606a; }
header .brand { font-weight:700; font-size:1.1rem; }
header nav ul { list-style:none; display:flex; gap:.25rem; margin:0; padding:0; flex-wrap:wrap; }
header form { margin-left:auto; }
header button { background:transparent; color:#fff; border:1px solid #8c959f; border-radius:4px; padding:.2rem .6rem; cursor:pointer; }
main { padding: 1rem 1.25rem 3rem; max-width: 1400px; }
h1 { font-size:1.5rem; margin:.25rem 0 1rem; }
h2 { font-size:1.15rem; margin:1.5rem 0 .5rem; }
table { border-collapse: collapse; width:100%; margin:.5rem 0; }
th, td { text-align:left; padding:.3rem .6rem; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:var(--panel); font-weight:600; }
pre { background:var(--panel); border:1px solid var(--line); padding:.75rem; overflow:auto; font-size:13px; }
code { font-size: 13px; }
.cards { display:flex; gap:1rem; flex-wrap:wrap; }
.card { border:1px solid var(--line); border-radius:6px; padding:.75rem 1rem; min-width:14rem; background:var(--panel); }
.card h2 { margin-top:0; }
dl.kv { display:grid; grid-template-columns:max-content 1fr; gap:.2rem 1rem; margin:0; }
dl.kv dt { color:var(--muted); }
dl.kv dd { margin:0; }
.state { font-weight:600; padding:.05rem .45rem; border-radius:999px; border:1px solid currentColor; white-space:nowrap; }
.s-ok { color:var(--ok); } .s-warn { color:var(--warn); } .s-bad { color:var(--bad); } .s-idle { color:var(--idle); }
.problems li { margin:.2rem 0; }
.site { border:1px solid var(--line); border-radius:6px; padding:.5rem 1rem; margin:1rem 0; }
.rack { display:flex; gap:1rem; flex-wrap:wrap; }
.rack-box { border:1px dashed var(--line); border-radius:6px; padding:.5rem; }
.node { border:1px solid var(--line); border-radius:6px; padding:.5rem .75rem; width:22rem; background:var(--panel); }
.node h4 { margin:.1rem 0 .4rem; display:flex; justify-content:space-between; gap:.5rem; }
.bar { display:block; margin:.15rem 0; }
.bar .r { fill:#0b57d0; } .bar .o { fill:#2da44e; } .bar .sp { fill:#bf8700; } .bar .f { fill:#eaeef2; }
.legend span { margin-right:.75rem; font-size:13px; }
.legend i { display:inline-block; width:.8rem; height:.8rem; margin-right:.25rem; vertical-align:-1px; }
.legend .r { background:#0b57d0; } .legend .o { background:#2da44e; } .legend .sp { background:#bf8700; } .legend .f { background:#eaeef2; border:1px solid var(--line); }
.vmchips { display:flex; flex-wrap:wrap; gap:.25rem; margin:.3rem 0; }
.vmchip { font-size:13px; text-decoration:none; border-radius:4px; padding:.05rem .4rem; color:#fff; }
.vmchip.s-ok { background:var(--ok); } .vmchip.s-warn { background:var(--warn); } .vmchip.s-bad { background:var(--bad); } .vmchip.s-idle { background:var(--idle); }
.small { font-size:13px; color:var(--muted); }
form.filters { display:flex; gap:.75rem; flex-wrap:wrap; align-items:end; margin:.5rem 0 1rem; }
form.filters label { display:flex; flex-direction:column; font-size:13px; color:var(--muted); }
form.filters select, form.filters input { font-size:14px; padding:.2rem .3rem; }
form.filters button, .login button { padding:.3rem .9rem; font-size:14px; }
.pager { display:flex; gap:1rem; margin:.5rem 0; }
.login { max-width: 30rem; margin: 4rem auto; border:1px solid var(--line); border-radius:6px; padding:1.5rem; }
.login input { width:100%; font: 14px monospace; padding:.4rem; margin:.5rem 0 1rem; }
.error { color:var(--bad); font-weight:600; }
.graph { overflow:auto; border:1px solid var(--line); }
.graph text { font: 11px system-ui, sans-serif; fill:#1b1f24; }
.graph .edge { stroke:#8c959f; fill:none; }
.graph rect { fill:#f6f8fa; stroke:#57606a; }
.graph .k-vm rect { fill:#dafbe1; } .graph .k-volume rect { fill:#ddf4ff; } .graph .k-node rect { fill:#fff8c5; }
.live { font-size:13px; color:#d0d7de; }
"#;

/// The only script: live updates over Server-Sent Events (`/events/live`).
/// Without it every page is complete; with it, VM and node states and the
/// newest events change in place. Every state it has shown is kept in
/// `window.cairnSeen` (the browser test reads it).
pub const JS: &str = r#"
"use strict";
(function () {
  if (!window.EventSource) return;
  var seen = window.cairnSeen = {};
  var live = document.getElementById("live");
  function cls(state) {
    if (state === "running" || state === "ready" || state === "healthy" || state === "none") return "s-ok";
    if (state === "pending" || state === "suspect" || state === "maintenance" || state === "degraded" || state === "unknown") return "s-warn";
    if (state === "stopped") return "s-idle";
    return "s-bad";
  }
  function paint(attr, name, state) {
    var list = document.querySelectorAll("[" + attr + "]");
    for (var i = 0; i < list.length; i++) {
      var el = list[i];
      if (el.getAttribute(attr) !== name) continue;
      el.classList.remove("s-ok", "s-warn", "s-bad", "s-idle");
      el.classList.add(cls(state));
      el.setAttribute("data-state", state);
      if (el.hasAttribute("data-state-text")) el.textContent = state;
      var label = el.getAttribute("aria-label");
      if (label !== null) el.setAttribute("aria-label", label.replace(/: [a-z-]+$/, ": " + state));
    }
  }
  var source = new EventSource("/events/live");
  source.addEventListener("states", function (m) {
    var data = JSON.parse(m.data);
    var now = Date.now();
    Object.keys(data.vms || {}).forEach(function (vm) {
      var s = data.vms[vm];
      (seen[vm] = seen[vm] || []).push([now, s]);
      paint("data-vm", vm, s);
    });
    Object.keys(data.nodes || {}).forEach(function (node) {
      paint("data-node", node, data.nodes[node]);
    });
    if (live) live.textContent = "live";
  });
  source.addEventListener("event", function (m) {
    var e = JSON.parse(m.data);
    // A crash reported by its node: red at once, before the next observation.
    if (e.kind === "vm" && e.result === "crashed" && e.object && e.object.indexOf("vm ") === 0) {
      var crashed = e.object.slice(3);
      (seen[crashed] = seen[crashed] || []).push([Date.now(), "crashed"]);
      paint("data-vm", crashed, "crashed");
    }
    var list = document.getElementById("recent-events");
    if (!list) return;
    var li = document.createElement("li");
    li.textContent = e.at + " " + e.kind + " " + e.result + (e.object ? " " + e.object : "") + (e.reason ? ": " + e.reason : "");
    list.insertBefore(li, list.firstChild);
    while (list.children.length > 20) list.removeChild(list.lastChild);
  });
  source.onerror = function () { if (live) live.textContent = "reconnecting"; };
})();
"#;
