// flowers web page: upload a photo, compare the ensemble and the student, ask for Grad-CAM.
// Everything shown from data (class names, file names, versions, error messages) goes through
// textContent, never innerHTML; the page's CSP allows scripts and requests from this origin only.
"use strict";

const ROUTES = ["ensemble", "student"];
const PREVIEW_TYPES = ["image/jpeg", "image/png", "image/webp"];
const TOP_K = 5;
const $ = (sel, root = document) => root.querySelector(sel);

const state = { file: null, models: {}, result: null, busy: false, previewUrl: null };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function show(node, on) { node.hidden = !on; }

function megabytes(n) {
  return n % 1048576 === 0 ? `${n / 1048576} MiB` : `${(n / 1e6).toFixed(1)} MB`;
}

function setError(message) {
  const box = $("#error");
  box.textContent = message || "";
  show(box, Boolean(message));
}

function setStatus(message) { $("#status").textContent = message; }

// the API answers every error as JSON {"error", "status"}; show exactly that message
async function apiError(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") message = `${body.status || response.status}: ${body.error}`;
  } catch (e) { /* not JSON: keep the status line */ }
  return message;
}

async function loadModels() {
  try {
    const r = await fetch("v1/models", { headers: { accept: "application/json" } });
    if (!r.ok) throw new Error(await apiError(r));
    const body = await r.json();
    state.maxBytes = body.max_body_bytes;
    for (const m of body.models) state.models[m.route] = m;
    $("#limits").textContent = `JPEG, PNG or WebP, up to ${megabytes(body.max_body_bytes)}`;
    for (const route of ROUTES) renderMeta(route);
  } catch (e) {
    setError(`could not read the served models (GET /v1/models): ${e.message}`);
  }
}

function renderMeta(route) {
  const m = state.models[route];
  const panel = $(`#panel-${route}`);
  if (!m) return;
  $(".m-name", panel).textContent = m.kind ? `${m.name} (${m.kind})` : m.name;
  $(".m-version", panel).textContent = m.version == null ? "unregistered (served from a file)" : String(m.version);
  $(".m-alias", panel).textContent = m.alias == null ? "none" : m.alias;
}

function clearPanels() {
  for (const route of ROUTES) {
    const panel = $(`#panel-${route}`);
    $(".topk", panel).replaceChildren();
    $(".entropy", panel).replaceChildren();
    $(".m-latency", panel).textContent = "–";
    show($(".panel-error", panel), false);
    show($(".cam", panel), false);
    panel.removeAttribute("data-ready");
    panel.removeAttribute("data-cam");
  }
  show($("#agreement"), false);
  $("#explain").disabled = true;
  document.body.removeAttribute("data-round-trip-ms");
}

function renderPrediction(route, r) {
  const panel = $(`#panel-${route}`);
  const list = $(".topk", panel);
  list.replaceChildren();
  for (const t of r.top_k) {
    const li = el("li");
    li.append(el("span", "cls", t.name), el("span", "pct", `${(100 * t.probability).toFixed(1)} %`));
    const bar = el("span", "bar");
    const fill = el("span", "fill");
    fill.style.width = `${Math.max(0, Math.min(100, 100 * t.probability)).toFixed(2)}%`;  // CSSOM, not markup
    bar.append(fill);
    li.append(bar);
    li.dataset.probability = String(t.probability);
    list.append(li);
  }
  const m = state.models[route] || {};
  const thr = typeof m.uncertainty_threshold === "number" ? m.uncertainty_threshold.toFixed(2) : "?";
  const flag = el("span", `flag ${r.uncertain ? "uncertain" : "confident"}`, r.uncertain ? "uncertain" : "confident");
  $(".entropy", panel).replaceChildren(`entropy ${r.entropy.toFixed(3)} (threshold ${thr}) `, flag);
  $(".m-latency", panel).textContent = `${r.latency_ms.toFixed(1)} ms in the server (batch of ${r.batch_size})`;
  panel.dataset.ready = "1";
}

function renderAgreement(body) {
  const box = $("#agreement");
  box.className = body.agree ? "agree" : "disagree";
  box.textContent = body.agree
    ? `Both models say: ${body.ensemble.name}`
    : `The models disagree: ensemble says ${body.ensemble.name}, student says ${body.student.name}`;
  show(box, true);
}

function formData(file) {
  const fd = new FormData();
  fd.append("file", file, file.name);
  return fd;
}

async function classify(file) {
  if (state.busy) return;
  state.busy = true;
  state.file = file;
  state.result = null;
  clearPanels();
  setError("");
  $("#filename").textContent = `${file.name} (${file.size.toLocaleString()} bytes)`;
  // preview only what a browser shows as a plain picture; anything else is never rendered here
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = PREVIEW_TYPES.includes(file.type) ? URL.createObjectURL(file) : null;
  const preview = $("#preview");
  if (state.previewUrl) preview.src = state.previewUrl; else preview.removeAttribute("src");
  show(preview, Boolean(state.previewUrl));
  show($("#photo"), true);
  $("#cam-status").textContent = "";
  setStatus("classifying…");
  const t0 = performance.now();
  try {
    const r = await fetch(`v1/compare?top_k=${TOP_K}`, { method: "POST", body: formData(file) });
    if (!r.ok) {
      setError(await apiError(r));
      setStatus("");
      return;
    }
    const body = await r.json();
    for (const route of ROUTES) renderPrediction(route, body[route]);
    renderAgreement(body);
    // timed when the panels are on screen: the frame after the one that draws them
    requestAnimationFrame(() => requestAnimationFrame(() => {
      const ms = performance.now() - t0;
      document.body.dataset.roundTripMs = ms.toFixed(1);
      setStatus(`both answers shown ${ms.toFixed(0)} ms after the upload started ` +
                `(compare: ${body.latency_ms.toFixed(0)} ms in the server)`);
    }));
    state.result = body;
    $("#explain").disabled = false;
    // GET /v1/models is the source of the versions shown; a model swapped meanwhile shows up here
    if (ROUTES.some((k) => state.models[k] && String(state.models[k].version) !== String(body[k].version))) loadModels();
  } catch (e) {
    setError(`request failed: ${e.message}`);
    setStatus("");
  } finally {
    state.busy = false;
  }
}

async function explainOne(route) {
  const panel = $(`#panel-${route}`);
  const label = state.result[route].label;
  const err = $(".panel-error", panel);
  show(err, false);
  try {
    const r = await fetch(`v1/explain/${route}?label=${label}`, { method: "POST", body: formData(state.file) });
    if (!r.ok) {
      err.textContent = `Grad-CAM: ${await apiError(r)}`;
      show(err, true);
      return;
    }
    const body = await r.json();
    const fig = $(".cam", panel);
    const img = $("img", fig);
    img.src = `data:image/png;base64,${body.png_base64}`;
    img.alt = `Grad-CAM heat map of ${body.name} over the photo`;
    $("figcaption", fig).textContent =
      `Grad-CAM of ${body.name} (p ${body.probability.toFixed(2)}) on the ${body.image_size} px centre crop, ` +
      `${body.maps > 1 ? `mean of ${body.maps} members' maps, ` : ""}${body.explained}; ${body.latency_ms.toFixed(0)} ms`;
    show(fig, true);
    panel.dataset.cam = "1";
  } catch (e) {
    err.textContent = `Grad-CAM request failed: ${e.message}`;
    show(err, true);
  }
}

async function explain() {
  if (!state.result || !state.file) return;
  const button = $("#explain");
  button.disabled = true;
  const status = $("#cam-status");
  status.textContent = "computing Grad-CAM…";
  const t0 = performance.now();
  await Promise.all(ROUTES.map(explainOne));
  status.textContent = `Grad-CAM of both models in ${(performance.now() - t0).toFixed(0)} ms`;
  button.disabled = false;
}

function setup() {
  const input = $("#file");
  const drop = $("#drop");
  input.addEventListener("change", () => {
    if (input.files.length) classify(input.files[0]);
    input.value = "";  // choosing the same file again is a new request
  });
  // a file dropped outside the drop zone must not make the browser open it (an HTML or SVG file would run)
  for (const ev of ["dragover", "drop"]) window.addEventListener(ev, (e) => e.preventDefault());
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
  });
  $("#explain").addEventListener("click", explain);
  loadModels();
}

document.addEventListener("DOMContentLoaded", setup);
