// The neuron explorer: POST /inspect reads a text, and the page colours each character by one unit's
// activation after reading it, lists the units that track features of the text, and shows the model's
// next-character predictions for the character under the pointer or the keyboard focus.
// Uses $, catalog, headers, apiErrorMessage and activeTab from playground.js.
"use strict";
const FEATURES = {
  column: "position in the line",
  in_brackets: "inside ( ) or [ ]",
  in_quotes: "inside quotes",
  speaker: "a speaker's name",
  line_end: "end of a line",
};
const ex = {
  request: null, // the /inspect body the shown result came from
  result: null, // its response
  values: new Map(), // unit -> one activation per character of result.text
  unit: null, // the unit shown
  focus: 0, // the character that takes the keyboard focus
};

function exShowError(message) { $("ex-error").textContent = message || ""; }
function exStatus(text) { $("ex-status").textContent = text; }
function exModel() { return catalog.models.find((m) => m.name === $("ex-model").value) || null; }

function fillExModels() {
  const keep = $("ex-model").value;
  $("ex-model").innerHTML = "";
  for (const m of catalog.models) {
    const o = document.createElement("option");
    o.value = m.name;
    o.textContent = `${m.name} (${m.arch} ${m.num_layers}x${m.hidden_size})`;
    o.selected = keep ? m.name === keep : m.name === catalog.default;
    $("ex-model").appendChild(o);
  }
  fillLayers();
}

// The layer and state choices, and the unit's range, follow the model.
function fillLayers() {
  const m = exModel();
  if (!m) return;
  const keep = $("ex-layer").value;
  $("ex-layer").innerHTML = "";
  for (let i = 0; i < m.num_layers; i++) {
    const o = document.createElement("option");
    o.value = String(i);
    o.textContent = i === m.num_layers - 1 ? `${i} (last)` : i === 0 ? `${i} (first)` : String(i);
    $("ex-layer").appendChild(o);
  }
  $("ex-layer").value = keep !== "" && Number(keep) < m.num_layers ? keep : String(m.num_layers - 1);
  const lstm = m.arch === "lstm";
  $("ex-state").querySelector('option[value="c"]').disabled = !lstm;
  if (!lstm) $("ex-state").value = "h";
  $("ex-unit").max = String(m.hidden_size - 1);
}

async function postInspect(body) {
  const r = await fetch("/inspect", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!r.ok) throw new Error(await apiErrorMessage(r));
  return r.json();
}

function addValues(result) {
  result.units.forEach((unit, j) => ex.values.set(unit, result.activations.map((row) => row[j])));
}

async function runInspect() {
  exShowError("");
  const m = exModel();
  if (!m) { exShowError("No model loaded (is an API key needed? Set it on the Generate tab)."); return; }
  const body = {
    model: m.name,
    text: $("ex-text").value,
    layer: Number($("ex-layer").value),
    state: $("ex-state").value,
    top: 5,
    unknown_chars: $("ex-skip").checked ? "skip" : "error",
  };
  const unitText = $("ex-unit").value.trim();
  if (unitText !== "") body.units = [Number(unitText)];
  $("ex-inspect").disabled = true;
  exStatus("Reading the text...");
  try {
    const result = await postInspect(body);
    ex.request = body;
    ex.result = result;
    ex.values = new Map();
    ex.focus = 0;
    addValues(result);
    drawText();
    drawFeatures();
    drawUnits();
    $("ex-result").hidden = false;
    await showUnit(unitText !== "" ? Number(unitText) : bestUnit(result));
    const skipped = [...body.text].length - [...result.text].length;
    exStatus(`Read ${[...result.text].length} characters` +
      (skipped > 0 ? ` (${skipped} outside the vocabulary skipped).` : "."));
  } catch (err) {
    exShowError(err.message);
    exStatus("Error.");
  } finally {
    $("ex-inspect").disabled = false;
  }
}

// The unit with the strongest correlation to any feature; else the first unit read.
function bestUnit(result) {
  let best = null;
  for (const list of Object.values(result.features)) {
    for (const c of list) if (!best || Math.abs(c.r) > Math.abs(best.r)) best = c;
  }
  return best ? best.unit : result.units[0];
}

// Shows one unit, reading its activations first when the last request did not include it.
async function showUnit(unit) {
  if (!ex.values.has(unit)) {
    exStatus(`Reading unit ${unit}...`);
    addValues(await postInspect({ ...ex.request, units: [unit] }));
    exStatus(`Read unit ${unit}.`);
  }
  ex.unit = unit;
  $("ex-unit").value = String(unit);
  paint();
  for (const b of document.querySelectorAll("#ex-features button, #ex-units button")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.unit) === unit));
  }
  const r = ex.result;
  const m = catalog.models.find((x) => x.name === r.model);
  const last = m ? ` of ${m.num_layers}` : "";
  const max = maxAbs(ex.values.get(unit));
  $("ex-shown").textContent = `${r.model} (${r.arch}), layer ${r.layer}${last}, state ${r.state}, ` +
    `unit ${unit} of ${r.hidden_size}: max |value| ${max.toFixed(3)}`;
  $("ex-shown").dataset.unit = String(unit);
  $("ex-shown").dataset.layer = String(r.layer);
  $("ex-shown").dataset.state = r.state;
}

function maxAbs(values) { return values.reduce((a, v) => Math.max(a, Math.abs(v)), 0); }

// Blue for negative, red for positive, towards white as |value| / max |value| goes to 0.
function colour(value, max) {
  const a = max > 0 ? Math.min(1, Math.abs(value) / max) : 0;
  const target = value >= 0 ? [214, 48, 49] : [38, 110, 210];
  const [r, g, b] = target.map((c) => Math.round(255 + (c - 255) * a));
  return { background: `rgb(${r}, ${g}, ${b})`, dark: a > 0.65 };
}

function visible(ch) { return ch === "\n" ? "\u21b5" : ch === " " ? "\u2423" : ch; }

function drawText() {
  const view = $("ex-view");
  view.innerHTML = "";
  [...ex.result.text].forEach((ch, i) => {
    const s = document.createElement("span");
    s.className = "ex-char";
    s.dataset.i = String(i);
    s.tabIndex = i === ex.focus ? 0 : -1;
    if (ch === "\n") {
      s.classList.add("ex-nl");
      s.textContent = "\u21b5\n"; // the mark, then the line break (the view keeps white space)
    } else {
      s.textContent = ch;
    }
    view.appendChild(s);
  });
}

function paint() {
  const values = ex.values.get(ex.unit);
  const max = maxAbs(values);
  $("ex-view").querySelectorAll(".ex-char").forEach((s, i) => {
    const c = colour(values[i], max);
    s.style.backgroundColor = c.background;
    s.style.color = c.dark ? "#fff" : "";
    s.dataset.value = values[i].toFixed(4);
  });
}

function unitButton(unit, label) {
  const b = document.createElement("button");
  b.type = "button";
  b.dataset.unit = String(unit);
  b.textContent = label;
  b.setAttribute("aria-pressed", "false");
  b.onclick = () => showUnit(unit).then(() => exShowError(""), (err) => { exShowError(err.message); exStatus("Error."); });
  return b;
}

function drawFeatures() {
  const box = $("ex-features");
  box.innerHTML = "";
  const names = [...Object.keys(FEATURES), ...Object.keys(ex.result.features).filter((f) => !(f in FEATURES))];
  for (const name of names) {
    const list = ex.result.features[name];
    if (list === undefined) continue;
    const row = document.createElement("div");
    row.className = "ex-feature";
    row.dataset.feature = name;
    const label = document.createElement("span");
    label.textContent = name;
    label.title = FEATURES[name] || "";
    row.appendChild(label);
    if (list.length === 0) {
      const none = document.createElement("span");
      none.textContent = "does not vary in this text";
      row.appendChild(none);
    }
    for (const c of list) {
      const b = unitButton(c.unit, `unit ${c.unit}  r=${c.r >= 0 ? "+" : ""}${c.r.toFixed(2)}`);
      b.setAttribute("aria-label", `unit ${c.unit}, r ${c.r.toFixed(2)} with ${FEATURES[name] || name}`);
      row.appendChild(b);
    }
    box.appendChild(row);
  }
}

function drawUnits() {
  $("ex-units").innerHTML = "";
  for (const unit of ex.result.units) $("ex-units").appendChild(unitButton(unit, String(unit)));
}

function showPredictions(span) {
  const i = Number(span.dataset.i);
  const chars = [...ex.result.text];
  for (const s of $("ex-view").querySelectorAll(".selected")) s.classList.remove("selected");
  span.classList.add("selected");
  const box = $("ex-predictions");
  box.innerHTML = "";
  const head = document.createElement("p");
  head.id = "ex-pred-context";
  head.textContent = `After "${visible(chars[i])}" (character ${i + 1} of ${chars.length}), ` +
    `unit ${ex.unit} = ${ex.values.get(ex.unit)[i].toFixed(3)}. Next:`;
  box.appendChild(head);
  const table = document.createElement("table");
  for (const p of ex.result.top[i]) {
    const tr = document.createElement("tr");
    tr.className = "ex-pred";
    const c = document.createElement("td");
    c.textContent = visible(p.char);
    const v = document.createElement("td");
    v.textContent = `${(100 * p.prob).toFixed(1)}%`;
    const barCell = document.createElement("td");
    barCell.style.width = "50%";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${Math.max(1, 100 * p.prob)}%`;
    barCell.appendChild(bar);
    tr.append(c, v, barCell);
    table.appendChild(tr);
  }
  box.appendChild(table);
}

// Roving focus over the characters: one tab stop; arrows, Home and End move.
function moveFocus(to) {
  const spans = $("ex-view").querySelectorAll(".ex-char");
  if (!spans.length) return;
  to = Math.max(0, Math.min(spans.length - 1, to));
  spans[ex.focus].tabIndex = -1;
  ex.focus = to;
  spans[to].tabIndex = 0;
  spans[to].focus();
}

function lineStep(from, dir) {
  const chars = [...ex.result.text];
  const start = (i) => { while (i > 0 && chars[i - 1] !== "\n") i--; return i; };
  const col = from - start(from);
  let i = from;
  if (dir > 0) { while (i < chars.length && chars[i] !== "\n") i++; i++; } else { i = start(from) - 1; }
  if (i < 0 || i >= chars.length) return from;
  const s = start(i);
  let end = s;
  while (end < chars.length - 1 && chars[end] !== "\n") end++;
  return Math.min(s + col, end);
}

$("ex-view").addEventListener("mouseover", (e) => {
  const s = e.target.closest(".ex-char");
  if (s) showPredictions(s);
});
$("ex-view").addEventListener("focusin", (e) => {
  const s = e.target.closest(".ex-char");
  if (s) { ex.focus = Number(s.dataset.i); showPredictions(s); }
});
$("ex-view").addEventListener("keydown", (e) => {
  const last = $("ex-view").querySelectorAll(".ex-char").length - 1;
  const moves = {
    ArrowRight: () => ex.focus + 1, ArrowLeft: () => ex.focus - 1, Home: () => 0, End: () => last,
    ArrowDown: () => lineStep(ex.focus, 1), ArrowUp: () => lineStep(ex.focus, -1),
  };
  if (!(e.key in moves)) return;
  e.preventDefault();
  moveFocus(moves[e.key]());
});
$("ex-controls").addEventListener("submit", (e) => { e.preventDefault(); runInspect(); });
$("ex-model").onchange = fillLayers;
document.addEventListener("keydown", (e) => {
  if (activeTab() === "explorer" && e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("ex-inspect").disabled) {
    e.preventDefault();
    runInspect();
  }
});
document.addEventListener("rnnserve:models", fillExModels);
if (catalog.models.length) fillExModels();
