// The Train view: a text (pasted or uploaded) becomes a training job; its loss curve is drawn live from the
// job's event stream; once the model is served, a sample is generated from it. Uses playground.js' helpers.
"use strict";
const tr = { id: null, name: null, stream: null };

function trStatus(text, status) {
  $("tr-status").textContent = text;
  if (status) $("tr-status").dataset.status = status;
}
function trError(message) { $("tr-error").textContent = message || ""; }
function trButtons(active) {
  $("tr-start").disabled = active;
  $("tr-cancel").disabled = !active;
}

// Both losses on one scale (nats/char), x by training seconds.
function drawCurve(curve) {
  const W = 640, H = 260, pad = 30;
  const pts = curve.filter((p) => p.train_loss !== null || p.val_loss !== null);
  const losses = pts.flatMap((p) => [p.train_loss, p.val_loss]).filter((v) => v !== null);
  if (!losses.length) { $("tr-train-line").setAttribute("points", ""); $("tr-val-line").setAttribute("points", ""); return; }
  const lo = Math.min(...losses), hi = Math.max(...losses), span = Math.max(hi - lo, 1e-6);
  const tmax = Math.max(...pts.map((p) => p.elapsed_s), 1e-6);
  const xy = (p, v) => `${(pad + (W - 2 * pad) * p.elapsed_s / tmax).toFixed(1)},${(H - pad - (H - 2 * pad) * (v - lo) / span).toFixed(1)}`;
  $("tr-train-line").setAttribute("points", pts.filter((p) => p.train_loss !== null).map((p) => xy(p, p.train_loss)).join(" "));
  $("tr-val-line").setAttribute("points", pts.filter((p) => p.val_loss !== null).map((p) => xy(p, p.val_loss)).join(" "));
  $("tr-ymax").textContent = `${hi.toFixed(2)} nats/char`;
  $("tr-ymin").textContent = `${lo.toFixed(2)}  (${tmax.toFixed(0)} s)`;
}

function describe(job) {
  const p = job.progress;
  const loss = (v) => (v === null ? "-" : v.toFixed(3));
  const rate = p.chars_per_s ? `, ${Math.round(p.chars_per_s).toLocaleString()} chars/s` : "";
  const head = `${job.name}: ${job.status}`;
  if (job.status === "queued") return `${head} (waiting for the worker)`;
  if (job.status === "failed") return `${head}: ${job.error}`;
  const body = `step ${p.step}, ${p.elapsed_s.toFixed(0)} s of ${job.minutes * 60} s, train ${loss(p.train_loss)}, val ${loss(p.val_loss)} nats/char${rate}`;
  if (job.status === "succeeded" && job.metrics) {
    return `${head}: held-out ${job.metrics.test_nats_per_char.toFixed(3)} nats/char (${job.metrics.test_bits_per_char.toFixed(3)} bits/char), ${body}`;
  }
  return `${head}: ${body}`;
}

function onJob(job) {
  tr.name = job.name;
  drawCurve(job.curve);
  trStatus(describe(job), job.status);
}

// SSE over fetch (EventSource cannot send the Authorization header).
async function follow(id) {
  tr.stream = new AbortController();
  let r;
  try {
    r = await fetch(`/trainings/${id}/events`, { headers: headers(), signal: tr.stream.signal });
  } catch (_) { return; }
  if (!r.ok) { trError(await apiErrorMessage(r)); trButtons(false); return; }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let last = null;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (!data) continue;
        const body = JSON.parse(data);
        if (event === "error") { trError(body.error.message); continue; }
        last = body;
        onJob(body);
      }
    }
  } catch (_) { /* aborted, or the connection dropped */ }
  trButtons(false);
  if (last && last.status === "succeeded") await whenServed(last.name);
}

// The servers pick a new model up within their poll interval.
async function whenServed(name) {
  const deadline = Date.now() + 120000;
  while (Date.now() < deadline) {
    const r = await fetch(`/models/${encodeURIComponent(name)}`, { headers: headers() });
    if (r.ok) {
      $("tr-generate").disabled = false;
      $("tr-open").disabled = false;
      $("tr-status").dataset.served = name;
      loadModels();
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  trError(`${name} is trained but no server has loaded it yet.`);
}

async function startTraining() {
  trError("");
  $("tr-sample").textContent = "";
  $("tr-generate").disabled = $("tr-open").disabled = true;
  delete $("tr-status").dataset.served;
  const body = {
    name: $("tr-name").value.trim(), text: $("tr-text").value, arch: $("tr-arch").value,
    hidden_size: Number($("tr-hidden").value), num_layers: Number($("tr-layers").value),
    minutes: Number($("tr-minutes").value), overwrite: $("tr-overwrite").checked,
  };
  trButtons(true);
  const r = await fetch("/trainings", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (r.status !== 202) { trError(await apiErrorMessage(r)); trButtons(false); return; }
  const job = await r.json();
  tr.id = job.id;
  onJob(job);
  follow(job.id);
}

async function cancelTraining() {
  if (!tr.id) return;
  const r = await fetch(`/trainings/${tr.id}`, { method: "DELETE", headers: headers() });
  if (!r.ok) trError(await apiErrorMessage(r));
}

async function sampleNewModel() {
  $("tr-generate").disabled = true;
  const req = { model: tr.name, prompt: "", max_tokens: 400, temperature: 0.8 };
  const r = await fetch("/generate", { method: "POST", headers: headers(), body: JSON.stringify(req) });
  $("tr-generate").disabled = false;
  if (!r.ok) { trError(await apiErrorMessage(r)); return; }
  $("tr-sample").textContent = (await r.json()).text;
}

$("tr-controls").addEventListener("submit", (e) => { e.preventDefault(); startTraining(); });
$("tr-cancel").onclick = cancelTraining;
$("tr-generate").onclick = sampleNewModel;
$("tr-open").onclick = () => {
  selectTab("playground", false);
  $("model").value = tr.name;
};
$("tr-file").onchange = () => {
  const file = $("tr-file").files[0];
  if (!file) return;
  file.text().then((text) => {
    $("tr-text").value = text;
    if ($("tr-name").value === "my-model") $("tr-name").value = file.name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9_-]+/g, "-").replace(/^[-_]+/, "") || "my-model";
    trStatus(`${file.name}: ${text.length.toLocaleString()} characters.`);
  });
};
