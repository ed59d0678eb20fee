// The playground: streams generations over the WebSocket, continues and forks sessions; also the page's
// shared helpers ($, headers, apiErrorMessage, openSocket, the model list, the tabs) that explorer.js and
// compare.js use.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { ws: null, sessionId: null, running: false, started: 0, chars: 0 };
// GET /models as last loaded; "rnnserve:models" is dispatched on document whenever it changes.
const catalog = { default: null, models: [] };

function apiKey() { return $("apikey").value.trim(); }
function headers() {
  const h = { "content-type": "application/json" };
  if (apiKey()) h.authorization = "Bearer " + apiKey();
  return h;
}
function showError(message) { $("error").textContent = message || ""; }
// "<status>: <message>" from the API's {"error": {"type", "message", "param"}} shape, whatever came back.
async function apiErrorMessage(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: a proxy's page, say */ }
  const err = body && body.error;
  if (!err || typeof err.message !== "string") return `HTTP ${response.status} ${response.statusText}`.trim();
  const param = err.param && !err.message.includes(err.param) ? ` (field: ${err.param})` : "";
  const hint = response.status === 401 ? " Set the API key on the Generate tab." : "";
  return `${response.status} ${err.type}: ${err.message}${param}${hint}`;
}
function setStatus(text) { $("status").textContent = text; }
function setRunning(running) {
  state.running = running;
  $("generate").disabled = running;
  $("cancel").disabled = !running;
  $("continue").disabled = running || !state.sessionId;
  $("fork").disabled = running || !state.sessionId;
}

async function loadModels() {
  const r = await fetch("/models", { headers: headers() });
  if (!r.ok) { showError(await apiErrorMessage(r)); return; }
  const body = await r.json();
  showError("");
  catalog.default = body.default;
  catalog.models = body.models;
  $("model").innerHTML = "";
  for (const m of body.models) {
    const o = document.createElement("option");
    o.value = m.name;
    o.textContent = `${m.name} (${m.arch} ${m.num_layers}x${m.hidden_size})`;
    o.selected = m.name === body.default;
    $("model").appendChild(o);
  }
  document.dispatchEvent(new CustomEvent("rnnserve:models", { detail: catalog }));
}

function request(continuing) {
  const strategy = $("strategy").value;
  const req = { type: "generate", strategy, max_tokens: Number($("max_tokens").value) };
  if (strategy === "sample") {
    req.temperature = Number($("temperature").value);
    req.top_p = Number($("top_p").value);
    req.top_k = Number($("top_k").value);
  }
  if (strategy === "beam") req.beam_width = Number($("beam_width").value);
  const seed = $("seed").value.trim();
  if (seed !== "") req.seed = /^\d+$/.test(seed) ? seed : Number(seed);
  if (continuing) { req.session_id = state.sessionId; req.prompt = ""; }
  else { req.model = $("model").value; req.prompt = $("prompt").value; }
  return req;
}

// Seeds go up to 2**63 - 1, past what a JS number holds exactly: they travel as digit strings in the page
// and as bare JSON numbers on the wire.
function wireJson(message) {
  const text = JSON.stringify(message);
  return typeof message.seed === "string" ? text.replace(`"seed":"${message.seed}"`, `"seed":${message.seed}`) : text;
}
function exactSeed(raw, msg) {
  const m = /"seed":(\d+)/.exec(raw);
  if (m && msg.type === "done") msg.seed = m[1];
  return msg;
}

// A socket on /ws/generate, authenticated by a first {"type": "auth"} message when a key is set (browsers
// cannot set an Authorization header on a WebSocket); resolves once open.
function openSocket(onmessage, onclose) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(location.origin.replace(/^http/, "ws") + "/ws/generate");
    ws.onopen = () => {
      if (apiKey()) ws.send(JSON.stringify({ type: "auth", api_key: apiKey() }));
      resolve(ws);
    };
    ws.onerror = () => reject(new Error("WebSocket connection failed"));
    ws.onclose = onclose;
    ws.onmessage = (e) => onmessage(exactSeed(e.data, JSON.parse(e.data)));
  });
}

async function socket() {
  if (state.ws && state.ws.readyState <= 1) return state.ws;
  state.ws = await openSocket(onMessage, (e) => {
    if (e.code === 1008) showError("API key refused: " + e.reason);
    if (state.running) { setRunning(false); setStatus("Connection closed."); }
    state.ws = null;
  });
  return state.ws;
}

function onMessage(msg) {
  if (msg.type === "token") {
    $("output").append(msg.text);
    state.chars += msg.text.length;
    const seconds = (performance.now() - state.started) / 1000;
    setStatus(`Generating... ${state.chars} chars, ${(state.chars / seconds).toFixed(0)} chars/s`);
  } else if (msg.type === "done") {
    state.sessionId = msg.session_id;
    $("status").dataset.finishReason = msg.finish_reason;
    $("status").dataset.sessionId = msg.session_id || "";
    const seconds = (performance.now() - state.started) / 1000;
    setRunning(false);
    setStatus(`Done: ${msg.finish_reason}. ${msg.usage.completion_chars} chars at ` +
      `${(msg.usage.completion_chars / seconds).toFixed(0)} chars/s; session ${msg.session_id || "not saved"}, seed ${msg.seed}.`);
  } else if (msg.type === "error") {
    $("status").dataset.finishReason = "error";
    setRunning(false);
    showError(msg.error.message);
    setStatus("Error.");
  }
}

async function generate(continuing) {
  showError("");
  if (!continuing) {
    $("output").textContent = "";
    const p = document.createElement("span");
    p.className = "prompt";
    p.textContent = $("prompt").value;
    $("output").appendChild(p);
  }
  try {
    const ws = await socket();
    state.started = performance.now();
    state.chars = 0;
    delete $("status").dataset.finishReason;
    setRunning(true);
    setStatus("Generating...");
    ws.send(wireJson(request(continuing)));
  } catch (err) { showError(err.message); setRunning(false); }
}

async function fork() {
  const r = await fetch(`/sessions/${state.sessionId}/fork`, { method: "POST", headers: headers() });
  if (!r.ok) { showError(await apiErrorMessage(r)); return; }
  const body = await r.json();
  state.sessionId = body.session_id;
  setStatus(`Forked: now continuing session ${body.session_id} (${body.chars} chars).`);
}

$("controls").addEventListener("submit", (e) => { e.preventDefault(); generate(false); });
$("cancel").onclick = () => state.ws && state.ws.send(JSON.stringify({ type: "cancel" }));
$("continue").onclick = () => generate(true);
$("fork").onclick = fork;
$("reset").onclick = () => {
  state.sessionId = null;
  $("output").textContent = "";
  delete $("status").dataset.finishReason;
  delete $("status").dataset.sessionId;
  showError("");
  setRunning(false);
  setStatus("Ready.");
};
$("strategy").onchange = () => {
  for (const el of document.querySelectorAll("[data-for]")) el.classList.toggle("hidden", el.dataset.for !== $("strategy").value);
};
$("apikey").onchange = () => { localStorage.setItem("rnnserve-key", apiKey()); if (state.ws) state.ws.close(); loadModels(); };
document.addEventListener("keydown", (e) => {
  if (activeTab() !== "playground") return;
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !state.running) generate(false);
  if (e.key === "Escape" && state.running) $("cancel").click();
});

// Tabs: Generate, Explorer, Compare, Train; the URL's #explorer / #compare / #train opens one directly.
const TABS = ["playground", "explorer", "compare", "train"];
function activeTab() { return TABS.find((t) => !$("panel-" + t).hidden) || "playground"; }
function selectTab(name, focus) {
  for (const t of TABS) {
    const on = t === name;
    $("tab-" + t).setAttribute("aria-selected", String(on));
    $("tab-" + t).tabIndex = on ? 0 : -1;
    $("panel-" + t).hidden = !on;
  }
  if (focus) $("tab-" + name).focus();
  history.replaceState(null, "", name === "playground" ? location.pathname : "#" + name);
}
for (const t of TABS) {
  $("tab-" + t).onclick = () => selectTab(t, false);
  $("tab-" + t).onkeydown = (e) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
    if (step) selectTab(TABS[(TABS.indexOf(t) + step + TABS.length) % TABS.length], true);
  };
}
if (TABS.includes(location.hash.slice(1))) selectTab(location.hash.slice(1), false);
$("apikey").value = localStorage.getItem("rnnserve-key") || "";
loadModels();
