// alignloop operator console: four pages drawn from the JSON routes under /admin/console/.
// No framework: each page is one render function over one JSON document, redrawn every
// few seconds. Text from the server (versions, reasons, model answers) is only ever set as
// textContent, never parsed as HTML. The admin token lives in this tab's sessionStorage and
// travels in the Authorization header, never in a URL.
"use strict";

const REFRESH_MS = 5000;
const TOKEN_KEY = "alignloop.console.token";
const OPERATOR_KEY = "alignloop.console.operator";
const PAGES = { policies: renderPolicies, canary: renderCanary, training: renderTraining,
                traffic: renderTraffic };
const live = { history: [] };  // the Traffic page's scraped samples since the page opened
let selectedRound = null;
let timer = null;
let pendingCharts = [];  // charts drawn once their page is in the document

// --- small helpers -------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);
const fmtPct = (x) => (x === null || x === undefined ? "—" : (100 * x).toFixed(1) + "%");
const fmtNum = (x, d = 3) => (x === null || x === undefined || Number.isNaN(Number(x)) ? "—"
  : Number(x).toFixed(d));
const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
const badge = (text) => el("span", { class: "badge " + text }, text);

function table(headers, rows, rowAttrs) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((cells, i) =>
      el("tr", rowAttrs ? rowAttrs(i) : {}, cells.map((c) =>
        c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c))))));
}
const num = (x) => el("td", { class: "num" }, x);

function empty(message, ...more) {
  return el("div", { class: "empty" }, el("p", {}, message), ...more);
}

// plotly.js 3 takes titles as {text}: accept plain strings here.
function titled(layout) {
  const out = Object.assign({}, layout);
  for (const [key, value] of Object.entries(out)) {
    if (key === "title" && typeof value === "string") out.title = { text: value, font: { size: 13 } };
    else if (/^[xy]axis\d*$/.test(key) && value && typeof value.title === "string") {
      out[key] = Object.assign({}, value, { title: { text: value.title } });
    }
  }
  return out;
}

function chart(id, traces, layout, small) {
  const div = el("div", { id, class: small ? "chart small" : "chart" });
  // Plotly measures the element: draw once the page is attached (drawCharts).
  pendingCharts.push(() => {
    if (!window.Plotly || !div.isConnected) return;
    Plotly.react(div, traces, Object.assign({
      margin: { l: 55, r: 45, t: 40, b: 40 }, legend: { orientation: "h", y: -0.2 },
      font: { size: 12 }, paper_bgcolor: "#fff", plot_bgcolor: "#fff",
    }, titled(layout)), { displaylogo: false, responsive: true });
    div.dataset.drawn = "true";
  });
  div.dataset.traces = traces.length;
  return div;
}

function drawCharts() {
  const draws = pendingCharts;
  pendingCharts = [];
  for (const draw of draws) draw();
}

// --- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error && body.error.code;
  }
}

async function api(path, options) {
  // Who acts is the token's name on the server (GET /admin/whoami); no operator header.
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) };
  const init = Object.assign({ headers }, options || {});
  if (init.body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(init.body);
  }
  const response = await fetch(path, init);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const error = new ApiError(response.status, body);
    if (response.status === 401 || response.status === 403) showLogin(error.message);
    throw error;
  }
  return body;
}

// --- login ---------------------------------------------------------------------------------

function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(OPERATOR_KEY);
  clearInterval(timer);
  $("page").hidden = true;
  $("nav").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

async function login(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("login-token").value.trim());
  try {
    const me = await api("/admin/whoami");
    sessionStorage.setItem(OPERATOR_KEY, me.operator);
  } catch (error) {
    showLogin(error.message);
    return;
  }
  $("login-token").value = "";
  start();
}

function start() {
  $("login").hidden = true;
  $("page").hidden = false;
  $("nav").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = "signed in as " + sessionStorage.getItem(OPERATOR_KEY);
  if (!location.hash) location.hash = "#policies";
  show();
}

function currentPage() {
  const name = location.hash.replace("#", "");
  return PAGES[name] ? name : "policies";
}

async function show() {
  if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin();
  const name = currentPage();
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.page === name);
  }
  clearInterval(timer);
  await refresh();
  timer = setInterval(refresh, REFRESH_MS);
}

async function refresh() {
  if ($("action-dialog").open) return;  // never redraw under an operator's typing
  const name = currentPage();
  try {
    pendingCharts = [];
    const content = await PAGES[name]();
    if (name !== currentPage()) return;  // the operator moved on meanwhile
    const page = $("page");
    page.replaceChildren(content);
    drawCharts();
    page.dataset.page = name;
    page.dataset.loadedAt = String(Date.now());
    $("status").textContent = "updated " + new Date().toLocaleTimeString() +
      " · refreshes every " + REFRESH_MS / 1000 + " s";
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) return;
    $("status").textContent = "could not load: " + error.message;
  }
}

// --- actions (admin API commands) ----------------------------------------------------------

const ACTIONS = {
  promote: { title: "Promote", path: (v) => `/admin/policies/${v}/promote`,
    help: "Make this version stable for all routed traffic." },
  canary: { title: "Canary", path: (v) => `/admin/policies/${v}/canary`, weight: true,
    help: "Serve this version to a share of routed traffic; the controller evaluates it." },
  reject: { title: "Reject", path: (v) => `/admin/policies/${v}/reject`,
    help: "Take this version out of consideration for good." },
  rollback: { title: "Roll back", path: () => "/admin/rollback",
    help: "End the canary, or put the previous stable back." },
  rollback_to: { title: "Make stable again", path: () => "/admin/rollback", to: true,
    help: "Put this earlier version back as stable." },
  hold: { title: "Hold", path: () => "/admin/hold",
    help: "Stop the controller's automatic moves until resumed." },
  resume: { title: "Resume", path: () => "/admin/resume",
    help: "Let the controller act again." },
};

function actionButton(action, version) {
  const spec = ACTIONS[action];
  return el("button", { type: "button", dataset: { action, version: version || "" },
                        onclick: () => openAction(action, version) }, spec.title);
}

function openAction(action, version) {
  const spec = ACTIONS[action];
  const dialog = $("action-dialog");
  $("action-title").textContent = spec.title + (version ? " " + version : "");
  $("action-help").textContent = spec.help;
  $("action-weight-label").hidden = !spec.weight;
  $("action-reason").value = "";
  $("action-error").textContent = "";
  dialog.dataset.action = action;
  dialog.dataset.version = version || "";
  dialog.showModal();
  $("action-reason").focus();
}

async function confirmAction(event) {
  event.preventDefault();
  const dialog = $("action-dialog");
  const action = dialog.dataset.action;
  const version = dialog.dataset.version;
  const spec = ACTIONS[action];
  const body = { reason: $("action-reason").value.trim() };
  if (!body.reason) {
    $("action-error").textContent = "A reason is required: it goes to the audit log.";
    return;
  }
  if (spec.weight) body.weight = Number($("action-weight").value);
  if (spec.to) body.to = version;
  try {
    await api(spec.path(version), { method: "POST", body });
  } catch (error) {
    $("action-error").textContent = error.message;
    return;
  }
  dialog.close();
  const operator = sessionStorage.getItem(OPERATOR_KEY);
  const written = await api(`/admin/console/audit?actor=${encodeURIComponent(operator)}&limit=1`);
  await refresh();
  const entry = written.entries[0];
  if (entry) {
    $("page").prepend(el("div", { class: "notice", id: "audit-written" },
      el("strong", {}, "Audit entry written: "),
      `#${entry.id} ${entry.action} ${entry.version || ""} ` +
      `${entry.from_state || ""}${entry.to_state ? " → " + entry.to_state : ""} ` +
      `by ${entry.actor} — “${entry.reason}”`));
  }
}

// --- Policies ------------------------------------------------------------------------------

function policyActions(v, routing) {
  const buttons = [];
  if (["candidate", "canary", "retired", "rolled_back"].includes(v.state)) buttons.push("promote");
  if (["candidate", "rolled_back"].includes(v.state) && !routing.canary_version) buttons.push("canary");
  if (v.state === "canary") buttons.push("rollback");
  if (["candidate", "canary"].includes(v.state)) buttons.push("reject");
  if (v.state === "stable" && !routing.canary_version && v.parent_version) buttons.push("rollback");
  if (["retired", "rolled_back"].includes(v.state)) buttons.push("rollback_to");
  return buttons.map((a) => actionButton(a, v.version));
}

async function renderPolicies() {
  const data = await api("/admin/console/policies");
  const r = data.routing;
  const routingLine = el("div", { class: "card", id: "routing" },
    el("strong", {}, "Routing: "), `stable ${r.stable_version}`,
    r.canary_version ? ` · canary ${r.canary_version} at ${fmtPct(r.canary_weight)}` : " · no canary",
    r.held ? el("span", { class: "error" }, ` · held by ${r.held_by}: ${r.held_reason}`) : "",
    " ", r.held ? actionButton("resume") : actionButton("hold"),
    el("span", { class: "muted" }, ` · generation ${r.generation}`));
  const rows = data.versions.map((v) => {
    const ci = v.up_rate_interval;
    return [
      el("strong", {}, v.version), badge(v.state), v.parent_version || "—",
      v.reward_model_version || "—", v.training_round ?? "—", fmtTime(v.created_at),
      fmtTime(v.promoted_at), num(fmtPct(v.routed_share)), num(fmtPct(v.served_share)),
      num(v.live.served), num(v.live.rated),
      num(v.live.up_rate === null ? "—"
        : `${fmtPct(v.live.up_rate)} [${fmtPct(ci[0])}, ${fmtPct(ci[1])}]`),
      el("td", { class: "actions" }, policyActions(v, r)),
    ];
  });
  const rated = data.versions.filter((v) => v.up_rate_interval);
  const upChart = rated.length ? chart("policies-chart", [{
    type: "bar", x: rated.map((v) => v.version), y: rated.map((v) => v.live.up_rate),
    error_y: { type: "data", symmetric: false,
      array: rated.map((v) => v.up_rate_interval[1] - v.live.up_rate),
      arrayminus: rated.map((v) => v.live.up_rate - v.up_rate_interval[0]) },
    marker: { color: rated.map((v) => (v.state === "stable" ? "#1a7f37"
      : v.state === "canary" ? "#b54708" : "#2e5aac")) },
    name: "thumbs-up rate",
  }], { title: "Thumbs-up rate per version (95% Wilson interval)",
        yaxis: { tickformat: ".0%", range: [0, 1] } }, true)
    : empty("No ratings yet. Ratings arrive through POST /v1/feedback (see docs/feedback.md).");
  const audit = table(["#", "when", "actor", "action", "version", "move", "reason"],
    data.audit.map((e) => [e.id, fmtTime(e.at), e.actor, e.action, e.version || "—",
      e.from_state || e.to_state ? `${e.from_state || ""} → ${e.to_state || ""}` : "",
      e.reason]));
  return el("div", {},
    el("h1", {}, "Policies"), routingLine,
    table(["version", "state", "parent", "reward model", "round", "created", "promoted",
      "routed", `served (${data.recent_minutes} min)`, "answers", "rated", "thumbs up [95% CI]",
      "actions"], rows, (i) => ({ dataset: { version: data.versions[i].version } })),
    el("h2", {}, "Thumbs-up rate"), el("div", { class: "card" }, upChart),
    el("h2", {}, "Audit log (newest first)"), audit);
}

// --- Canary --------------------------------------------------------------------------------

function canaryChart(data) {
  const p = data.points;
  const x = p.map((q) => q.at);
  const traces = [
    { x, y: p.map((q) => q.upper), mode: "lines", line: { width: 0 }, name: "upper",
      showlegend: false, hoverinfo: "skip" },
    { x, y: p.map((q) => q.lower), mode: "lines", line: { width: 0 }, fill: "tonexty",
      fillcolor: "rgba(46,90,172,0.18)", name: `${Math.round(100 * (1 - (data.alpha || 0.05)))}% confidence sequence` },
    { x, y: p.map((q) => q.estimate), mode: "lines+markers", name: "thumbs-up difference (canary − stable)",
      line: { color: "#2e5aac" }, marker: { size: 4 } },
  ];
  const shapes = [];
  if (data.threshold !== null && data.threshold !== undefined) {
    shapes.push({ type: "line", xref: "paper", x0: 0, x1: 1, y0: data.threshold, y1: data.threshold,
      line: { color: "#b42318", dash: "dash" } });
  }
  shapes.push({ type: "line", xref: "paper", x0: 0, x1: 1, y0: 0, y1: 0, line: { color: "#999", width: 1 } });
  if (data.outcome) {
    const last = p.length ? p[p.length - 1] : null;
    traces.push({ x: [data.outcome.at], y: [last ? last.estimate : 0], mode: "markers+text",
      marker: { size: 13, symbol: "star", color: data.outcome.to_state === "stable" ? "#1a7f37" : "#b42318" },
      text: [data.outcome.action], textposition: "top center", name: "decision" });
  }
  return chart("canary-chart", traces, {
    title: `Thumbs-up difference over time; dashed line: threshold θ = ${fmtNum(data.threshold)} ` +
      "(promote when the band is above, roll back when below)",
    shapes, yaxis: { tickformat: ".0%", zeroline: false }, xaxis: { type: "date" },
  });
}

function stagesChart(stages) {
  return chart("canary-stages", ["stable", "canary"].map((arm) => ({
    type: "bar", name: arm, x: stages.map((s) => `stage ${s.stage} (${fmtPct(s.weight)})`),
    y: stages.map((s) => s.votes[arm]),
  })), { title: "Votes per arm per ramp stage", barmode: "group" }, true);
}

async function renderCanary() {
  const data = await api("/admin/console/canary");
  if (!data.experiment) {
    return el("div", {}, el("h1", {}, "Canary"), empty(
      "No canary has run yet. The controller starts one when a training round registers a " +
      "candidate; an operator can start one from the Policies page (Canary button) or with " +
      "`alignloop policy canary VERSION --weight 0.1`."));
  }
  const e = data.experiment;
  const head = el("div", { class: "card", id: "canary-head" },
    el("strong", {}, e.version), " ", e.running ? badge("canary") : "",
    e.compared_with ? ` against stable ${e.compared_with}` : "",
    ` · started ${fmtTime(e.started_at)} by ${e.started_by}`,
    e.weight ? ` · weight ${fmtPct(e.weight)}` : "",
    e.held ? el("span", { class: "error" }, ` · held: ${e.held_reason}`) : "",
    data.outcome ? el("div", {}, el("strong", {}, "Decision: "),
      `${data.outcome.action} by ${data.outcome.actor} at ${fmtTime(data.outcome.at)} — ${data.outcome.reason}`) : "",
    el("div", { class: "muted" }, `${data.ticks} controller decisions · test ${data.test || "—"}`));
  const body = data.points.length ? canaryChart(data)
    : empty("No decision yet: the controller records one per tick once the canary is running.");
  body.dataset.points = String(data.points.length);
  const srm = data.srm;
  const srmOk = srm.p_value === null || srm.p_value === undefined || srm.p_value >= srm.threshold;
  const h = (data.guardrails.health || {});
  const arm = (pair, arm) => (pair ? pair[arm] : "—");
  const tiles = el("div", { class: "tiles" },
    tile("sample-ratio p", fmtNum(srm.p_value), srmOk ? "" : "error",
      srmOk ? `holds below ${fmtNum(srm.threshold)}` : "sample ratio mismatch: held for a human"),
    tile("requests (stable / canary)", `${arm(h.requests, "stable")} / ${arm(h.requests, "canary")}`),
    tile("5xx (stable / canary)", `${arm(h.errors_5xx, "stable")} / ${arm(h.errors_5xx, "canary")}`),
    tile("p95 latency ms", `${fmtNum(arm(h.latency_p95_ms, "stable"), 0)} / ${fmtNum(arm(h.latency_p95_ms, "canary"), 0)}`),
    tile("adapter load failures", h.adapter_load_failures ?? "—"),
    tile("guardrail breaches", (data.guardrails.breaches || []).length,
      (data.guardrails.breaches || []).length ? "error" : "", (data.guardrails.breaches || []).join("; ")));
  const stageRows = data.stages.map((s) => [s.stage, fmtPct(s.weight), num(s.votes.stable),
    num(s.votes.canary), num(s.new_users.stable ?? "—"), num(s.new_users.canary ?? "—")]);
  return el("div", {}, el("h1", {}, "Canary"), head, el("div", { class: "card" }, body),
    el("h2", {}, "Sample ratio and guardrails"), tiles,
    el("h2", {}, "Ramp stages"),
    el("div", { class: "grid" },
      el("div", { class: "card" }, data.stages.length ? stagesChart(data.stages) : empty("No stage yet.")),
      table(["stage", "weight", "votes stable", "votes canary", "new users stable", "new users canary"], stageRows)),
    el("h2", {}, "The controller's newest decisions"),
    table(["when", "actor", "action", "reason"],
      data.decisions.map((d) => [fmtTime(d.at), d.actor, d.action, d.reason])));
}

function tile(label, value, cls, note) {
  return el("div", { class: "tile" }, el("div", { class: "label" }, label),
    el("div", { class: "value " + (cls || "") }, String(value)),
    note ? el("div", { class: "muted" }, note) : "");
}

// --- Training ------------------------------------------------------------------------------

async function requestRound(event) {
  event.preventDefault();
  const reason = $("round-reason").value.trim();
  try {
    await api("/admin/console/rounds", { method: "POST", body: { reason } });
    $("round-error").textContent = "";
  } catch (error) {
    $("round-error").textContent = error.message;
    return;
  }
  await refresh();
}

function curveChart(id, title, c, names, y2) {
  const traces = names.map((name) => ({ x: c.iteration, y: c[name], name, mode: "lines+markers",
    yaxis: y2 && y2.includes(name) ? "y2" : "y" }));
  const layout = { title, xaxis: { title: "iteration" } };
  if (y2) layout.yaxis2 = { overlaying: "y", side: "right" };
  return chart(id, traces, layout, true);
}

function roundControl(data) {
  const running = data.rounds.find((r) => r.status === "running");
  const req = data.request;
  const form = el("form", { id: "round-form", onsubmit: requestRound },
    el("label", {}, "Start a round now — reason (goes to the round's trigger)",
      el("input", { id: "round-reason", required: true, placeholder: "e.g. new prompts from support" })),
    el("button", { type: "submit" }, "Start a round now"),
    el("p", { id: "round-error", class: "error", role: "alert" }));
  const status = [];
  if (req && !req.taken_at) status.push(el("p", { id: "round-request" },
    `Request #${req.id} by ${req.requested_by} waits for the training loop (it polls every few seconds).`));
  if (running) {
    const done = data.round && data.round.id === running.id ? data.curves.iteration.length : 0;
    const planned = running.iterations_planned || 1;
    status.push(el("p", { id: "round-progress" }, `Round ${running.id} running: ${done} of ${planned} PPO iterations`),
      el("div", { class: "progress" }, el("div", { style: `width:${Math.min(100, 100 * done / planned)}%` })));
  }
  return el("div", { class: "card" }, form, status);
}

async function renderTraining() {
  const data = await api("/admin/console/training" + (selectedRound ? `?round=${selectedRound}` : ""));
  const parts = [el("h1", {}, "Training"), roundControl(data)];
  if (!data.rounds.length) {
    parts.push(empty("No training round yet. The training loop starts one after enough new " +
      "ratings (see docs/training.md), or use “Start a round now”."));
  } else {
    parts.push(el("h2", {}, "Rounds"), table(
      ["round", "status", "trigger", "data watermark", "started", "finished", "candidate", "reward model", "outcome / gate"],
      data.rounds.map((r) => [r.id, badge(r.status), r.trigger,
        r.watermark ? Object.entries(r.watermark).map(([k, v]) => `${k} ${v}`).join(", ") : "—",
        fmtTime(r.started_at), fmtTime(r.finished_at), r.candidate_version || "—",
        r.reward_model_version || "—", r.reason || "—"]),
      (i) => ({ class: "clickable" + (data.round && data.round.id === data.rounds[i].id ? " selected" : ""),
                dataset: { round: data.rounds[i].id },
                onclick: () => { selectedRound = data.rounds[i].id; refresh(); } })));
  }
  const c = data.curves;
  if (data.round) {
    parts.push(el("h2", {}, `Round ${data.round.id}: PPO iterations`));
    parts.push(c.iteration.length ? el("div", { class: "grid", id: "training-curves", dataset: { iterations: c.iteration.length } },
      curveChart("curve-reward", "Reward (raw and normalised)", c, ["reward_raw", "reward_normalized"], ["reward_normalized"]),
      curveChart("curve-kl", "KL to the reference and β", c, ["kl_ref", "kl_coef"], ["kl_coef"]),
      curveChart("curve-clip", "Clip fraction and entropy", c, ["clip_fraction", "entropy"], ["entropy"]),
      curveChart("curve-length", "Response length and explained variance", c, ["response_length", "explained_variance"], ["explained_variance"]))
      : empty("This round has recorded no PPO iteration yet."));
    parts.push(evaluationPart(data.round.evaluation));
  }
  if (data.reward_vs_kl.length) {
    parts.push(el("h2", {}, "Reward gain against KL, across rounds"), el("div", { class: "card" },
      chart("reward-vs-kl", [{ x: data.reward_vs_kl.map((p) => p.kl), y: data.reward_vs_kl.map((p) => p.reward_gain),
        text: data.reward_vs_kl.map((p) => `round ${p.round} (${p.status})`), mode: "markers+text",
        textposition: "top center", type: "scatter", name: "rounds" }],
      { xaxis: { title: "KL to the reference (nats, held-out)" }, yaxis: { title: "reward gain over stable" } }, true)));
  }
  parts.push(el("h2", {}, "Reward models"), data.reward_models.length ? table(
    ["version", "status", "kind", "parent", "held-out pairwise accuracy", "thumbs AUC", "reason"],
    data.reward_models.map((m) => [m.version, badge(m.status), m.kind, m.parent_version || "—",
      num(fmtNum(m.metrics.pairwise_accuracy)), num(fmtNum(m.metrics.auc)), m.reason]))
    : empty("No reward model yet: the first round trains one from the ratings."));
  return el("div", {}, parts);
}

function evaluationPart(ev) {
  if (!ev) return empty("No offline evaluation for this round (it ended before evaluating).");
  const s = ev.stable || {};
  const k = ev.candidate || {};
  const metrics = table(["", "stable", "candidate"], [
    ["mean reward", num(fmtNum(s.reward)), num(fmtNum(k.reward))],
    ["mean length (tokens)", num(fmtNum(s.length_tokens, 1)), num(fmtNum(k.length_tokens, 1))],
    ["distinct-2", num(fmtNum(s.distinct_2)), num(fmtNum(k.distinct_2))],
  ]);
  const tiles = el("div", { class: "tiles" }, tile("win rate vs stable", fmtPct(ev.win_rate)),
    tile("reward gain", fmtNum(ev.reward_gain)), tile("KL to reference", fmtNum(ev.kl_to_reference)),
    tile("held-out prompts", ev.prompts ?? "—"));
  const examples = (ev.examples || []).filter((x) => x.stable !== undefined);
  return el("div", {}, el("h2", {}, "Offline evaluation against stable"), tiles, metrics,
    el("h2", {}, "The same held-out prompts, side by side"),
    examples.length ? table(["prompt", "stable", "candidate"],
      examples.map((x) => [el("div", { class: "answer" }, x.prompt),
        el("div", { class: "answer" }, x.stable, el("div", { class: "muted" }, `reward ${fmtNum(x.stable_reward)}`)),
        el("div", { class: "answer" }, x.candidate, el("div", { class: "muted" }, `reward ${fmtNum(x.candidate_reward)}`))]))
      : empty("No side-by-side answers recorded for this round."));
}

// --- Traffic and feedback ------------------------------------------------------------------

function byPolicy(rows, value) {
  const groups = {};
  for (const r of rows) (groups[r.policy] = groups[r.policy] || []).push(r);
  return Object.entries(groups).map(([policy, rs]) => ({
    x: rs.map((r) => r.minute), y: rs.map(value), name: policy, mode: "lines+markers", type: "scatter" }));
}

async function renderTraffic() {
  const [data, scraped] = await Promise.all([api("/admin/console/traffic"), api("/admin/console/live")]);
  const parts = [el("h1", {}, "Traffic and feedback"), liveTiles(scraped.targets)];
  if (!data.answers.length && !data.ratings.length) {
    parts.push(empty(`No answers or ratings in the last ${data.minutes} minutes. Send a chat ` +
      "request (README, first steps) or drive simulated users: `alignloop simulate`."));
    return el("div", {}, parts);
  }
  const t = { xaxis: { type: "date" } };
  parts.push(el("div", { class: "grid", id: "traffic-charts" },
    chart("traffic-answers", byPolicy(data.answers, (r) => r.answers), { ...t, title: "Answers per minute" }, true),
    chart("traffic-tokens", byPolicy(data.answers, (r) => r.tokens_per_s), { ...t, title: "Generated tokens/s" }, true),
    chart("traffic-latency", [
      ...byPolicy(data.answers, (r) => r.latency_ms.p50).map((s) => ({ ...s, name: s.name + " p50" })),
      ...byPolicy(data.answers, (r) => r.latency_ms.p99).map((s) => ({ ...s, name: s.name + " p99", line: { dash: "dot" } })),
    ], { ...t, title: "Latency (ms): p50 and p99" }, true),
    chart("traffic-ratings", byPolicy(data.ratings, (r) => r.ratings), { ...t, title: "Ratings per minute" }, true),
    chart("traffic-lag", [
      ...byPolicy(data.answers, (r) => r.ingest_lag_s).map((s) => ({ ...s, name: s.name + " answers" })),
      ...byPolicy(data.ratings, (r) => r.ingest_lag_s).map((s) => ({ ...s, name: s.name + " ratings" })),
    ], { ...t, title: "Ingest lag (s, event to row)" }, true),
    data.failures.length
      ? chart("traffic-failures", byPolicy(data.failures, (r) => r.failures), { ...t, title: "Server errors per minute" }, true)
      : el("div", { class: "card" }, el("strong", {}, "Server errors per minute"),
        el("p", { class: "muted", id: "no-failures" }, `No server-side failure in the last ${data.minutes} minutes.`))));
  return el("div", {}, parts);
}

function liveTiles(targets) {
  if (!targets.length) {
    return el("p", { class: "muted" }, "Live process numbers (spool, queue, dead letters) are off: " +
      "set ALIGNLOOP_CONSOLE_METRICS_URLS to the serving and ingestor /metrics URLs.");
  }
  const now = Date.now();
  const total = (name) => targets.reduce((s, t) => s + ((t.samples || {})[name] || 0), 0);
  live.history.push({ t: now, spool: total("alignloop_events_spool_records"),
    queue: total("alignloop_events_queue_depth") });
  live.history = live.history.filter((h) => now - h.t < 30 * 60 * 1000);
  const down = targets.filter((t) => !t.up);
  return el("div", {}, el("div", { class: "tiles", id: "live-tiles" },
    tile("spool depth (events)", total("alignloop_events_spool_records")),
    tile("publisher queue", total("alignloop_events_queue_depth")),
    tile("Kafka reachable (replicas)", `${total("alignloop_events_kafka_up")}`),
    tile("in flight", total("alignloop_requests_in_flight")),
    tile("dead letters (total)", total("alignloop_ingest_dead_letters_total"),
      total("alignloop_ingest_dead_letters_total") ? "error" : ""),
    tile("consumer lag (events)", total("alignloop_ingest_consumer_lag")),
    tile("scrape targets down", down.length, down.length ? "error" : "",
      down.map((t) => `${t.url}: ${t.error}`).join("; "))),
    live.history.length > 1 ? chart("live-spool", [
      { x: live.history.map((h) => new Date(h.t)), y: live.history.map((h) => h.spool), name: "spool", mode: "lines" },
      { x: live.history.map((h) => new Date(h.t)), y: live.history.map((h) => h.queue), name: "queue", mode: "lines" },
    ], { title: "Spool and queue since this page opened", xaxis: { type: "date" } }, true) : "");
}

// --- start ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("action-form").addEventListener("submit", confirmAction);
  $("action-cancel").addEventListener("click", () => $("action-dialog").close());
  $("logout").addEventListener("click", () => showLogin());
  window.addEventListener("hashchange", () => { if (sessionStorage.getItem(TOKEN_KEY)) show(); });
  // A tab signed in before the operator came from the token has no name: sign in again.
  if (sessionStorage.getItem(TOKEN_KEY) && sessionStorage.getItem(OPERATOR_KEY)) start();
  else showLogin();
});
