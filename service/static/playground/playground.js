// convserve playground: plain JavaScript, no build step, nothing loaded from elsewhere.
// Calls the service's own task endpoints and draws their answers on the image; with an embedding
// model, enrols the image in a gallery (/galleries) or searches one with it.
"use strict";

// The same colours as service/render.py (Tableau 10), by label_id.
const PALETTE = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
                 [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]];
const colour = (id, a = 1) => { const [r, g, b] = PALETTE[id % PALETTE.length]; return `rgba(${r},${g},${b},${a})`; };
const ENDPOINT = {classification: "classify", detection: "detect", segmentation: "segment", keypoints: "keypoints",
                  instance_segmentation: "instances", embedding: "embed"};
const KEYPOINT_DRAW_SCORE = 0.3;  // as service/render.py: less certain keypoints are answered, not drawn
const EMBEDDING_SHOWN = 8;  // the first values of an embedding, shown under the image
const SEARCH_K = 5;  // matches a gallery search lists
const DEFAULT_GALLERY = "playground";
const $ = (id) => document.getElementById(id);
const base = new URL("..", window.location.href);  // the service's root, wherever it is mounted
let models = [];
let lastFile = null;
let latest = 0;  // only the most recent request may draw: an earlier one that answers late is ignored

function headers() {
  const key = $("api_key").value.trim();
  sessionStorage.setItem("convserve-api-key", key);
  return key ? {"Authorization": "Bearer " + key} : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
  document.body.dataset.state = isError ? "error" : (text.startsWith("Done") ? "done" : "busy");
}

function current() { return models.find((m) => `${m.name}:${m.version}` === $("model").value); }
const ref = (m) => `${m.name}:${m.version}`;
const isEmbedding = (m) => Boolean(m) && m.task === "embedding";  // /embed's own task: no drawing, a gallery

function showOptions() {
  const m = current();
  for (const el of document.querySelectorAll("#options [data-task]")) {
    el.style.display = m && el.dataset.task.split(" ").includes(m.task) ? "" : "none";
  }
  $("cam-option").style.display = m && m.task === "classification" && m.outputs && m.outputs.cam ? "" : "none";
  $("gallery").hidden = !isEmbedding(m);
}

async function loadModels() {
  $("api_key").value = sessionStorage.getItem("convserve-api-key") || "";
  try {
    const r = await fetch(new URL("models", base), {headers: headers()});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : `HTTP ${r.status}`);
    models = body.models.filter((m) => ENDPOINT[m.task]);
    $("model").innerHTML = "";
    for (const m of models) {
      const opt = document.createElement("option");
      opt.value = `${m.name}:${m.version}`;
      opt.textContent = `${m.name}:${m.version} (${m.task})${m.default_version ? "" : " [older version]"}`;
      $("model").appendChild(opt);
    }
    showOptions();
    setStatus(models.length ? "Choose an image." : "No models are loaded.");
    document.body.dataset.models = String(models.length);
  } catch (e) {
    setStatus("Could not list the models: " + e.message, true);
  }
}

function form(model, file) {
  const data = new FormData();
  data.append("image", file);
  data.append("model", `${model.name}:${model.version}`);
  if (model.task === "classification") {
    data.append("top_k", $("top_k").value || "5");
    if ($("cam").checked && model.outputs && model.outputs.cam) data.append("cam", "true");
  } else if (model.task === "detection" || model.task === "keypoints") {
    data.append("score_threshold", $("score_threshold").value || "0.3");
  } else if (model.task === "instance_segmentation") {
    data.append("score_threshold", $("score_threshold").value || "0.3");
    data.append("mask_format", "png");  // each mask a PNG of its box's window
  } else if (model.task === "segmentation") {
    data.append("mask_format", "png");
  }
  return data;
}

async function run(file) {
  const model = current();
  if (!model || !file) return;
  if (file !== lastFile) $("item_id").value = file.name;  // a new image: its file name is its default id
  lastFile = file;
  const mine = ++latest;
  setStatus(`Asking ${model.name}:${model.version}...`);
  $("labels").innerHTML = ""; $("legend").innerHTML = ""; $("embedding").textContent = ""; $("timing").textContent = "";
  clearMatches();
  const t0 = performance.now();
  let response, body;
  try {
    response = await fetch(new URL(ENDPOINT[model.task], base), {method: "POST", body: form(model, file), headers: headers()});
    body = await response.json();
  } catch (e) {
    if (mine === latest) setStatus("The request failed: " + e.message, true);
    return;
  }
  const roundTrip = performance.now() - t0;
  if (mine !== latest) return;
  if (!response.ok) {
    setStatus(`${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`, true);
    return;
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, {imageOrientation: "from-image"});
  } catch (e) {
    bitmap = null;  // the service decoded it, the browser cannot (e.g. TIFF): draw on a blank canvas
  }
  if (mine !== latest) return;
  await draw(model, body, bitmap);
  if (mine !== latest) return;
  const t = body.timing;
  $("timing").textContent = `decode ${t.decode_ms} ms, inference ${t.inference_ms} ms (batch ${t.batch_size}), ` +
    `postprocess ${t.postprocess_ms} ms\nservice ${t.total_ms} ms, round trip ${roundTrip.toFixed(1)} ms`;
  setStatus(`Done: ${summary(model, body)}`);
  window.lastAnswer = body;
}

function summary(model, body) {
  if (model.task === "embedding") return `a ${body.dimensions}-dimensional embedding`;
  if (model.task === "classification") return body.labels.map((l) => `${l.label} ${l.score.toFixed(3)}`).join(", ");
  if (model.task === "detection" || model.task === "keypoints" || model.task === "instance_segmentation") {
    return `${body.detections.length} detection(s): ` +
      body.detections.map((d) => `${d.label} ${d.score.toFixed(2)}`).join(", ");
  }
  return `${body.classes.length} class(es): ` + body.classes.map((c) => `${c.label} (${c.area} px)`).join(", ");
}

function decodePng(b64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("bad PNG"));
    img.src = "data:image/png;base64," + b64;
  });
}

async function greyPixels(b64, w, h) {
  const img = await decodePng(b64);
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0, w, h);
  return ctx.getImageData(0, 0, w, h).data;  // RGBA; the grey value is in every channel
}

async function draw(model, body, bitmap) {
  const canvas = $("canvas");
  const w = body.image.width, h = body.image.height;
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#ddd"; ctx.fillRect(0, 0, w, h);
  if (bitmap) ctx.drawImage(bitmap, 0, 0, w, h);
  const line = Math.max(2, Math.round(Math.min(w, h) / 150));
  const font = Math.max(12, Math.round(Math.min(w, h) / 35));
  if (model.task === "detection" || model.task === "keypoints") {
    ctx.lineWidth = line; ctx.font = `${font}px sans-serif`; ctx.textBaseline = "bottom";
    for (const d of [...body.detections].reverse()) {
      const [x1, y1, x2, y2] = d.box;
      ctx.strokeStyle = colour(d.label_id);
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      const text = `${d.label} ${d.score.toFixed(2)}`;
      const tw = ctx.measureText(text).width + 6;
      ctx.fillStyle = colour(d.label_id);
      ctx.fillRect(x1, Math.max(0, y1 - font - 4), tw, font + 4);
      ctx.fillStyle = "#fff";
      ctx.fillText(text, x1 + 3, Math.max(font + 2, y1 - 1));
      if (d.keypoints) drawSkeleton(ctx, d, model.keypoints ? model.keypoints.skeleton : [], line);
    }
  } else if (model.task === "instance_segmentation") {
    // Each object's mask in a colour of its own (by rank, as service/render.py), box and label on top.
    const image = ctx.getImageData(0, 0, w, h);
    for (let rank = body.detections.length - 1; rank >= 0; rank--) {
      const d = body.detections[rank];
      const [x1, y1, x2, y2] = d.mask_box, bw = x2 - x1, bh = y2 - y1;
      if (!d.mask_png || bw <= 0 || bh <= 0) continue;
      const mask = await greyPixels(d.mask_png, bw, bh);
      const [r, g, b] = PALETTE[rank % PALETTE.length];
      for (let y = 0; y < bh; y++) {
        for (let x = 0; x < bw; x++) {
          if (mask[4 * (y * bw + x)] < 128) continue;
          const i = 4 * ((y1 + y) * w + x1 + x);
          image.data[i] = (image.data[i] + r) / 2;
          image.data[i + 1] = (image.data[i + 1] + g) / 2;
          image.data[i + 2] = (image.data[i + 2] + b) / 2;
        }
      }
    }
    ctx.putImageData(image, 0, 0);
    ctx.lineWidth = Math.max(1, Math.round(line / 2)); ctx.font = `${font}px sans-serif`; ctx.textBaseline = "bottom";
    body.detections.forEach((d, rank) => {
      const [x1, y1, x2, y2] = d.box;
      ctx.strokeStyle = colour(rank);
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.fillStyle = colour(rank);
      ctx.fillText(`${d.label} ${d.score.toFixed(2)}`, x1 + 2, Math.max(font + 2, y1 - 1));
    });
  } else if (model.task === "segmentation") {
    const map = await greyPixels(body.mask_png, w, h);
    const image = ctx.getImageData(0, 0, w, h);
    for (let i = 0; i < w * h; i++) {
      const id = map[4 * i];
      if (id === 0) continue;
      const [r, g, b] = PALETTE[id % PALETTE.length];
      image.data[4 * i] = (image.data[4 * i] + r) / 2;
      image.data[4 * i + 1] = (image.data[4 * i + 1] + g) / 2;
      image.data[4 * i + 2] = (image.data[4 * i + 2] + b) / 2;
    }
    ctx.putImageData(image, 0, 0);
    for (const c of body.classes) {
      const item = document.createElement("span");
      const swatch = item.appendChild(document.createElement("i"));
      swatch.style.background = colour(c.label_id);  // styles set from script: the CSP allows no style="" markup
      item.appendChild(document.createTextNode(`${c.label} (${c.area} px)`));
      $("legend").appendChild(item);
    }
  } else if (model.task === "embedding") {
    showEmbedding(model, body);  // nothing to draw on the image: its vector, in part, below it
  } else {
    body.labels.forEach((l, k) => {
      const li = document.createElement("li");
      li.appendChild(document.createElement("span")).textContent = `${l.label} ${l.score.toFixed(4)}`;
      const bar = li.appendChild(document.createElement("span"));
      bar.className = "bar";
      bar.style.width = `${Math.round(l.score * 200)}px`;
      if (l.heatmap_png) {
        li.className = "has-cam" + (k === 0 ? " selected" : "");
        li.onclick = async () => {
          for (const other of $("labels").children) other.classList.remove("selected");
          li.classList.add("selected");
          ctx.fillStyle = "#ddd"; ctx.fillRect(0, 0, w, h);
          if (bitmap) ctx.drawImage(bitmap, 0, 0, w, h);
          await overlayHeat(ctx, l.heatmap_png, w, h);
        };
      }
      $("labels").appendChild(li);
    });
    if (body.labels.length && body.labels[0].heatmap_png) await overlayHeat(ctx, body.labels[0].heatmap_png, w, h);
  }
}

// An object's keypoints: the skeleton's edges between, and dots on, those scoring >= KEYPOINT_DRAW_SCORE.
function drawSkeleton(ctx, d, skeleton, line) {
  const shown = d.keypoints.map((k) => k.score >= KEYPOINT_DRAW_SCORE);
  ctx.strokeStyle = colour(d.label_id); ctx.lineWidth = line;
  for (const [a, b] of skeleton) {
    if (!shown[a] || !shown[b]) continue;
    ctx.beginPath(); ctx.moveTo(d.keypoints[a].x, d.keypoints[a].y); ctx.lineTo(d.keypoints[b].x, d.keypoints[b].y);
    ctx.stroke();
  }
  ctx.fillStyle = "#fff";
  d.keypoints.forEach((k, i) => {
    if (!shown[i]) return;
    ctx.beginPath(); ctx.arc(k.x, k.y, line + 1, 0, 2 * Math.PI); ctx.fill(); ctx.stroke();
  });
}

async function overlayHeat(ctx, b64, w, h) {
  const heat = await greyPixels(b64, w, h);
  const image = ctx.getImageData(0, 0, w, h);
  for (let i = 0; i < w * h; i++) {
    const t = heat[4 * i] / 255, a = 0.25 + 0.45 * t;
    const hot = [Math.min(1, 2 * t), Math.max(0, Math.min(1, 2 - Math.abs(4 * t - 2))), Math.max(0, 1 - 2 * t)];
    for (let c = 0; c < 3; c++) image.data[4 * i + c] = image.data[4 * i + c] * (1 - a) + 255 * hot[c] * a;
  }
  ctx.putImageData(image, 0, 0);
}

function showEmbedding(model, body) {
  const el = $("embedding");
  const shown = body.embedding.slice(0, EMBEDDING_SHOWN);
  el.textContent = "";
  el.appendChild(document.createElement("strong")).textContent = `${body.dimensions} dimensions`;
  el.appendChild(document.createTextNode(
    ` (${model.embedding ? model.embedding.metric : "cosine"}), the first ${shown.length}: `));
  el.appendChild(document.createElement("code")).textContent =
    `[${shown.map((v) => v.toFixed(4)).join(", ")}${body.embedding.length > shown.length ? ", ..." : ""}]`;
}

// --- galleries: enrol the current image, or search with it --------------------------------------

// A request to the service answered in JSON: its body, or an Error "<status>: <the service's message>".
async function call(path, init = {}) {
  const response = await fetch(new URL(path, base), {...init, headers: {...headers(), ...(init.headers || {})}});
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;  // not JSON (a proxy's page): the status says enough
  }
  if (!response.ok) {
    const error = new Error(`${response.status}: ${body && body.error ? body.error.message : response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

const galleryPath = (name) => `galleries/${encodeURIComponent(name)}`;

function imageForm(file, fields) {
  const data = new FormData();
  data.append("image", file);
  for (const [key, value] of Object.entries(fields)) data.append(key, value);
  return data;
}

function clearMatches() {
  $("matches").hidden = true;
  $("matches").tBodies[0].innerHTML = "";
}

function showMatches(body) {
  const table = $("matches"), rows = table.tBodies[0];
  rows.innerHTML = "";
  table.caption.textContent = `Gallery ${body.gallery} (${body.model.name}:${body.model.version}): ` +
    (body.matches.length ? `the ${body.matches.length} nearest` : "no items");
  for (const m of body.matches) {
    const tr = rows.insertRow();
    tr.insertCell().textContent = m.id;
    const score = tr.insertCell();
    score.className = "score"; score.textContent = m.score.toFixed(3);
    const metadata = tr.insertCell();
    metadata.className = "metadata"; metadata.textContent = JSON.stringify(m.metadata);
  }
  table.hidden = false;
}

function showGalleryTiming(t, step) {
  $("timing").textContent = `decode ${t.decode_ms} ms, inference ${t.inference_ms} ms (batch ${t.batch_size}), ` +
    `${step} ${t[step + "_ms"]} ms\nservice ${t.total_ms} ms`;
}

// The gallery's info, after creating it (bound to the model) if there is none of that name.
async function ensureGallery(name, model) {
  try {
    return {info: await call(galleryPath(name)), created: false};
  } catch (e) {
    if (e.status !== 404) throw e;
  }
  try {
    const info = await call("galleries", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify({name, model: ref(model)})});
    return {info, created: true};
  } catch (e) {
    if (e.status !== 409) throw e;
    return {info: await call(galleryPath(name)), created: false};  // someone else created it meanwhile
  }
}

// The selected embedding model, the current image and the gallery's name; null (saying why) if any is missing.
function galleryTarget() {
  const model = current();
  if (!isEmbedding(model)) return null;
  if (!lastFile) {
    setStatus("Choose an image first.", true);
    return null;
  }
  const name = $("gallery_name").value.trim() || DEFAULT_GALLERY;
  $("gallery_name").value = name;
  return {model, file: lastFile, name};
}

// Runs one gallery request (its buttons disabled meanwhile); work answers the status line's "Done: ..." text.
async function galleryAction(busy, work) {
  const buttons = [$("enrol"), $("search")];
  for (const b of buttons) b.disabled = true;
  setStatus(busy);
  $("timing").textContent = "";
  try {
    setStatus(await work());
  } catch (e) {
    setStatus(e.status ? e.message : "The request failed: " + e.message, true);
  } finally {
    for (const b of buttons) b.disabled = false;
  }
}

async function enrol() {
  const target = galleryTarget();
  if (!target) return;
  const {model, file, name} = target;
  const id = $("item_id").value.trim() || file.name;
  await galleryAction(`Enrolling ${id} in gallery ${name}...`, async () => {
    const {created} = await ensureGallery(name, model);
    const fields = {id, metadata: JSON.stringify({file: file.name}), model: ref(model)};
    const body = await call(`${galleryPath(name)}/items`, {method: "POST", body: imageForm(file, fields)});
    window.lastGalleryAnswer = body;
    showGalleryTiming(body.timing, "store");
    return `Done: enrolled ${body.id} in ${created ? "the new " : ""}gallery ${body.gallery} ` +
      `(${body.count} item${body.count === 1 ? "" : "s"})`;
  });
}

async function search() {
  const target = galleryTarget();
  if (!target) return;
  const {model, file, name} = target;
  clearMatches();
  await galleryAction(`Searching gallery ${name}...`, async () => {
    const fields = {k: String(SEARCH_K), model: ref(model)};
    const body = await call(`${galleryPath(name)}/search`, {method: "POST", body: imageForm(file, fields)});
    window.lastGalleryAnswer = body;
    showMatches(body);
    showGalleryTiming(body.timing, "search");
    return `Done: ${body.matches.length} match(es) in gallery ${body.gallery}` +
      (body.matches.length ? `, the nearest ${body.matches[0].id} (${body.matches[0].score.toFixed(3)})` : "");
  });
}

$("enrol").addEventListener("click", enrol);
$("search").addEventListener("click", search);
$("model").addEventListener("change", () => { showOptions(); if (lastFile) run(lastFile); });
$("file").addEventListener("change", (e) => { if (e.target.files[0]) run(e.target.files[0]); });
$("api_key").addEventListener("change", loadModels);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) run(e.dataTransfer.files[0]);
});
loadModels();
