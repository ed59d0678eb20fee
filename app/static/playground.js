// The playground: streams generations over the WebSocket, continues and forks sessions.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { ws: null, sessionId: null, running: false, started: 0, chars: 0 };

function apiKey() { return $("apikey").value.trim(); }
function headers() {
  const h = { "content-type": "application/json" };
  if (apiKey()) h.authorization = "Bearer " + apiKey();
  return h;
}
function showError(message) { $("error").textContent = message || ""; }
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
  if (!r.ok) { showError((await r.json()).error.message); return; }
  const body = await r.json();
  $("model").innerHTML = "";
  for (const m of body.models) {
    const o = document.createElement("option");
    o.value = m.name;
    o.textContent = `${m.name} (${m.arch} ${m.num_layers}x${m.hidden_size})`;
    o.selected = m.name === body.default;
    $("model").appendChild(o);
  }
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
  if ($("seed").value !== "") req.seed = Number($("seed").value);
  if (continuing) { req.session_id = state.sessionId; req.prompt = ""; }
  else { req.model = $("model").value; req.prompt = $("prompt").value; }
  return req;
}

function socket() {
  if (state.ws && state.ws.readyState <= 1) return Promise.resolve(state.ws);
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(location.origin.replace(/^http/, "ws") + "/ws/generate");
    ws.onopen = () => {
      if (apiKey()) ws.send(JSON.stringify({ type: "auth", api_key: apiKey() }));
      state.ws = ws;
      resolve(ws);
    };
    ws.onerror = () => reject(new Error("WebSocket connection failed"));
    ws.onclose = (e) => {
      if (e.code === 1008) showError("API key refused: " + e.reason);
      if (state.running) { setRunning(false); setStatus("Connection closed."); }
      state.ws = null;
    };
    ws.onmessage = (e) => onMessage(JSON.parse(e.data));
  });
}

function onMessage(msg) {
  if (msg.type === "token") {
    $("output").append(msg.text);
    state.chars += msg.text.length;
    const seconds = (performance.now() - state.started) / 1000;
    setStatus(`Generating... ${state.chars} chars, ${(state.chars / seconds).toFixed(0)} chars/s`);
  } else if (msg.type === "done") {
    state.sessionId = msg.session_id;
    const seconds = (performance.now() - state.started) / 1000;
    setRunning(false);
    setStatus(`Done: ${msg.finish_reason}. ${msg.usage.completion_chars} chars at ` +
      `${(msg.usage.completion_chars / seconds).toFixed(0)} chars/s; session ${msg.session_id || "not saved"}, seed ${msg.seed}.`);
  } else if (msg.type === "error") {
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
    setRunning(true);
    setStatus("Generating...");
    ws.send(JSON.stringify(request(continuing)));
  } catch (err) { showError(err.message); setRunning(false); }
}

async function fork() {
  const r = await fetch(`/sessions/${state.sessionId}/fork`, { method: "POST", headers: headers() });
  const body = await r.json();
  if (!r.ok) { showError(body.error.message); return; }
  state.sessionId = body.session_id;
  setStatus(`Forked: now continuing session ${body.session_id} (${body.chars} chars).`);
}

$("controls").addEventListener("submit", (e) => { e.preventDefault(); generate(false); });
$("cancel").onclick = () => state.ws && state.ws.send(JSON.stringify({ type: "cancel" }));
$("continue").onclick = () => generate(true);
$("fork").onclick = fork;
$("reset").onclick = () => { state.sessionId = null; $("output").textContent = ""; showError(""); setRunning(false); setStatus("Ready."); };
$("strategy").onchange = () => {
  for (const el of document.querySelectorAll("[data-for]")) el.classList.toggle("hidden", el.dataset.for !== $("strategy").value);
};
$("apikey").onchange = () => { localStorage.setItem("rnnserve-key", apiKey()); if (state.ws) state.ws.close(); loadModels(); };
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !state.running) generate(false);
  if (e.key === "Escape" && state.running) $("cancel").click();
});
$("apikey").value = localStorage.getItem("rnnserve-key") || "";
loadModels();
