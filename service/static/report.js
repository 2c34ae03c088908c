// labelq report page: reads a dataset in the browser, sends it to this service's endpoints as an
// npz (binary, in its own precision) and shows the answers. No framework, no build step.
//
// Data flow: the file -> {labels, class names, the request body (an npz with exactly labels and
// pred_probs)} -> POST dataset-health once and find-issues on every change of options (debounced,
// the previous request aborted) -> npz answers parsed here -> heatmap, tables, flagged list.

import { NpzError, isZip, npyBytes, numbers, readNpz, scalar, strings, zipStored } from "./npz.js";

const $ = (selector) => document.querySelector(selector);
const CATEGORIES = ["ok", "label_issue", "out_of_distribution", "unconfident"];
const CATEGORY_TEXT = ["OK", "Label issue", "Out of distribution", "Unconfident"];
const CATEGORY_HELP = [
  "confidently its given label",
  "confidently another class",
  "below every class's out-of-distribution threshold",
  "counted nowhere, not out of distribution",
];
// viridis (matplotlib), 10 stops from dark to light; the heatmap runs it light (few) to dark (many)
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];
const DEBOUNCE_MS = 300;
const COMPACT_FROM_K = 21; // from this many classes the heatmap cells hold no text

const state = {
  dataset: null, // {fileName, n, k, labels: Int32Array, names: string[] | null, body: Blob}
  health: null,
  result: null, // the parsed find-issues answer
  query: "", // the query string of `result`
  filter: null, // {i, j} or null
  list: null, // Int32Array: positions in result.ranked of the examples listed
  page: 0,
  seq: 0, // find-issues requests started
  loadSeq: 0,
  controller: null,
  timer: null,
  inflight: 0,
  focus: { i: 0, j: 0 },
};

// ------------------------------------------------------------------ small helpers

const escapeHtml = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const fmtInt = (x) => Math.round(x).toLocaleString("en-US");
const fmtPct = (x) => `${(100 * x).toFixed(x > 0 && x < 0.001 ? 2 : 1)}%`;
const fmtNum = (x, digits = 4) => (Number.isFinite(x) ? x.toFixed(digits) : String(x));
/** A score: four decimals, or three significant digits below 0.001 (the worst scores are tiny). */
const fmtScore = (x) => (x !== 0 && Math.abs(x) < 0.001 ? x.toExponential(2) : fmtNum(x));

function className(c) {
  const names = state.dataset && state.dataset.names;
  return names ? names[c] : `class ${c}`;
}
function classLabel(c) {
  const names = state.dataset && state.dataset.names;
  return names ? `${c} ${names[c]}` : String(c);
}

function hexToRgb(hex) {
  const v = parseInt(hex.slice(1), 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}
const STOPS = VIRIDIS.map(hexToRgb);

/** Viridis at t in [0, 1] (0 dark, 1 light), linearly interpolated between the stops. */
function viridis(t) {
  const x = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  return STOPS[i].map((a, c) => Math.round(a + f * (STOPS[i + 1][c] - a)));
}

function luminance([r, g, b]) {
  const lin = (v) => {
    const s = v / 255;
    return s <= 0.03928 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
  };
  return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
}

/** Black or white, whichever contrasts more with the background (at least 4.58:1 either way). */
function textOn(rgb) {
  const l = luminance(rgb);
  return (l + 0.05) / 0.05 >= 1.05 / (l + 0.05) ? "#000000" : "#ffffff";
}

function setStatus(text) {
  $("#status").textContent = text;
}

function showError(err) {
  const box = $("#error");
  box.textContent = err instanceof Error ? err.message : String(err);
  box.hidden = false;
  setStatus("Something went wrong: see below.");
}

function clearError() {
  $("#error").hidden = true;
  $("#error").textContent = "";
}

/** Busy while a change of options waits out the debounce or a request is in flight. */
function updateBusy() {
  $("#results").setAttribute("aria-busy", state.timer !== null || state.inflight > 0 ? "true" : "false");
}

// ------------------------------------------------------------------ reading a dataset

async function datasetFromNpz(buffer, fileName) {
  const { names, arrays } = await readNpz(buffer, ["labels", "pred_probs", "class_names"]);
  for (const want of ["labels", "pred_probs"]) {
    if (!arrays[want]) throw new NpzError(`the npz has no array '${want}' (it holds: ${names.join(", ") || "nothing"})`);
  }
  const P = arrays.pred_probs;
  if (P.shape.length !== 2) throw new NpzError(`pred_probs must be 2-D (N x K); its shape is (${P.shape.join(", ")})`);
  const [n, k] = P.shape;
  const labelValues = numbers(arrays.labels);
  const classNames = arrays.class_names ? strings(arrays.class_names) : null;
  // The service reads an npz of exactly labels and pred_probs: forward the file itself when that is
  // what it holds, else a new (uncompressed) archive of those two members, bytes unchanged.
  const extra = names.filter((name) => name !== "labels" && name !== "pred_probs");
  const body =
    extra.length === 0
      ? new Blob([buffer], { type: "application/x-npz" })
      : await zipStored([
          { name: "labels.npy", bytes: arrays.labels.npy },
          { name: "pred_probs.npy", bytes: P.npy },
        ]);
  return { fileName, n, k, labelValues, classNames, body, dtype: P.descr, ignored: extra.filter((e) => e !== "class_names") };
}

function datasetFromJson(buffer, fileName) {
  let doc;
  try {
    doc = JSON.parse(new TextDecoder().decode(buffer));
  } catch (err) {
    throw new Error(`${fileName} is neither an npz (zip) archive nor JSON: ${err.message}`);
  }
  if (!doc || !Array.isArray(doc.labels) || !Array.isArray(doc.pred_probs)) {
    throw new Error("the JSON must be an object with arrays 'labels' and 'pred_probs' (and optionally 'class_names')");
  }
  const rows = doc.pred_probs;
  const n = rows.length;
  if (n === 0 || !Array.isArray(rows[0])) throw new Error("pred_probs must be a non-empty list of rows");
  const k = rows[0].length;
  const P = new Float64Array(n * k);
  rows.forEach((row, i) => {
    if (!Array.isArray(row) || row.length !== k) throw new Error(`pred_probs[${i}] has ${row && row.length} values; row 0 has ${k}`);
    for (let j = 0; j < k; j++) {
      if (typeof row[j] !== "number") throw new Error(`pred_probs[${i}][${j}] is not a number`);
      P[i * k + j] = row[j];
    }
  });
  const labels = new Float64Array(doc.labels.length);
  doc.labels.forEach((v, i) => {
    if (!Number.isSafeInteger(v)) throw new Error(`labels[${i}] = ${JSON.stringify(v)} is not an integer`);
    labels[i] = v;
  });
  const asInt64 = new BigInt64Array(labels.length);
  labels.forEach((v, i) => { asInt64[i] = BigInt(v); });
  const classNames = Array.isArray(doc.class_names) ? doc.class_names.map(String) : null;
  return {
    fileName, n, k, labelValues: labels, classNames, dtype: "<f8", ignored: [],
    bodyParts: [
      { name: "labels.npy", bytes: npyBytes("<i8", [labels.length], asInt64) },
      { name: "pred_probs.npy", bytes: npyBytes("<f8", [n, k], P) },
    ],
  };
}

async function readDataset(file) {
  const buffer = await file.arrayBuffer();
  const bytes = new Uint8Array(buffer);
  const raw = isZip(bytes) ? await datasetFromNpz(buffer, file.name) : datasetFromJson(buffer, file.name);
  if (raw.bodyParts) raw.body = await zipStored(raw.bodyParts);
  if (raw.labelValues.length !== raw.n) {
    throw new Error(`labels has ${raw.labelValues.length} entries but pred_probs has ${raw.n} rows`);
  }
  const labels = new Int32Array(raw.n);
  for (let i = 0; i < raw.n; i++) {
    const v = raw.labelValues[i];
    if (!Number.isInteger(v) || v < 0 || v >= raw.k) throw new Error(`labels[${i}] = ${v} is not a class index in [0, ${raw.k})`);
    labels[i] = v;
  }
  let names = raw.classNames;
  let note = "";
  if (names && names.length !== raw.k) {
    note = ` class_names has ${names.length} names for ${raw.k} classes: ignored.`;
    names = null;
  }
  if (raw.ignored.length) note += ` Ignored arrays: ${raw.ignored.join(", ")}.`;
  return { fileName: raw.fileName, n: raw.n, k: raw.k, labels, names, body: raw.body, dtype: raw.dtype, note };
}

// ------------------------------------------------------------------ the service

class ApiError extends Error {}

function currentQuery() {
  const params = new URLSearchParams();
  params.set("filter_by", $("#filter-by").value);
  const method = $("#method-percentile").checked ? "percentile" : "mean";
  params.set("thresholds", method);
  if (method === "percentile") params.set("class_percentile", $("#class-percentile").value);
  params.set("ood_percentile", $("#ood-percentile").value);
  return params.toString();
}

function headers() {
  const h = { "Content-Type": "application/x-npz", Accept: "application/x-npz" };
  const key = $("#api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function post(path, query, signal) {
  const url = new URL(path + (query ? `?${query}` : ""), document.baseURI);
  state.inflight++;
  updateBusy();
  try {
    return await request(url, path, signal);
  } finally {
    state.inflight--;
    updateBusy();
  }
}

async function request(url, path, signal) {
  const response = await fetch(url, { method: "POST", headers: headers(), body: state.dataset.body, signal });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const problem = await response.json();
      detail = `${problem.title || ""}: ${problem.detail || ""}${problem.field ? ` (field: ${problem.field})` : ""}`;
    } catch {
      // not a problem document
    }
    let hint = "";
    if (response.status === 401 || response.status === 403) hint = " Fill in the API key (it is sent as a Bearer token).";
    throw new ApiError(`${path} answered ${response.status}${detail ? ` ${detail}` : ""}.${hint}`);
  }
  return (await readNpz(await response.arrayBuffer())).arrays;
}

function matrix(arr) {
  return { k: arr.shape[0], values: numbers(arr) };
}

function parseFindIssues(a) {
  return {
    n: scalar(a.n_examples),
    k: scalar(a.n_classes),
    numIssues: scalar(a.num_label_issues),
    score: numbers(a.label_quality_score),
    suggested: numbers(a.suggested_label),
    ranked: numbers(a.ranked_issue_indices),
    category: numbers(a.category),
    categoryCounts: numbers(a.category_counts),
    thresholds: numbers(a.thresholds),
    oodThresholds: numbers(a.ood_thresholds),
    cj: matrix(a.confident_joint),
    estimated: scalar(a.estimated_num_label_issues),
  };
}

function parseHealth(a) {
  return {
    score: scalar(a.overall_label_health_score),
    numIssues: scalar(a.num_label_issues),
    classIndex: numbers(a.class_index),
    labelIssues: numbers(a.label_issues),
    inverseLabelIssues: numbers(a.inverse_label_issues),
    labelNoise: numbers(a.label_noise),
    inverseLabelNoise: numbers(a.inverse_label_noise),
    labelQuality: numbers(a.label_quality_score),
    pairA: numbers(a.class_index_a),
    pairB: numbers(a.class_index_b),
    pairCount: numbers(a.num_overlapping_examples),
    pairJoint: numbers(a.joint_probability),
  };
}

// ------------------------------------------------------------------ loading and refreshing

async function load(file) {
  const loadSeq = ++state.loadSeq;
  clearError();
  state.inflight++;
  updateBusy();
  setStatus(`Reading ${file.name}…`);
  try {
    const dataset = await readDataset(file);
    if (loadSeq !== state.loadSeq) return;
    state.dataset = dataset;
    state.health = null;
    state.result = null;
    state.filter = null;
    state.page = 0;
    state.focus = { i: 0, j: 0 };
    $("#dataset-info").textContent =
      `${dataset.fileName}: ${fmtInt(dataset.n)} examples, ${dataset.k} classes, pred_probs ${dataset.dtype}` +
      `${dataset.names ? ", with class names" : ""}.${dataset.note}`;
    setStatus(`Asking the service about ${fmtInt(dataset.n)} × ${dataset.k}…`);
    buildHeatmap();
    const query = currentQuery();
    const seq = ++state.seq;
    state.controller?.abort();
    const controller = (state.controller = new AbortController());
    const [health, result] = await Promise.all([
      post("dataset-health", "", controller.signal),
      post("find-issues", query, controller.signal),
    ]);
    if (loadSeq !== state.loadSeq) return;
    state.health = parseHealth(health);
    renderHealth();
    if (seq === state.seq) {
      state.result = parseFindIssues(result);
      state.query = query;
      render();
    } else {
      // the options changed while loading: that refresh renders
    }
  } catch (err) {
    if (err.name !== "AbortError" && loadSeq === state.loadSeq) showError(err);
  } finally {
    state.inflight--;
    updateBusy();
  }
}

function scheduleRefresh() {
  if (!state.dataset) return;
  clearTimeout(state.timer);
  setStatus("Updating…");
  state.timer = setTimeout(() => {
    state.timer = null;
    refresh();
  }, DEBOUNCE_MS);
  updateBusy();
}

async function refresh() {
  if (!state.dataset) return;
  const query = currentQuery();
  const seq = ++state.seq;
  state.controller?.abort();
  const controller = (state.controller = new AbortController());
  clearError();
  try {
    const answer = await post("find-issues", query, controller.signal);
    if (seq !== state.seq) return;
    state.result = parseFindIssues(answer);
    state.query = query;
    if (!state.health) state.health = parseHealth(await post("dataset-health", "", controller.signal));
    renderHealth();
    render();
  } catch (err) {
    if (err.name !== "AbortError" && seq === state.seq) showError(err);
  }
}

// ------------------------------------------------------------------ rendering

function render() {
  const r = state.result;
  const d = state.dataset;
  $("#empty").hidden = true;
  $("#report").hidden = false;
  $("#flagged-count").textContent = fmtInt(r.numIssues);
  $("#shape").textContent = `${fmtInt(d.n)} × ${d.k}`;
  renderCategories();
  updateHeatmap();
  renderThresholds();
  computeList();
  renderFlags();
  const results = $("#results");
  results.dataset.state = "ready";
  results.dataset.query = state.query;
  setStatus(`Showing ${d.fileName} with ${describeQuery(state.query)}.`);
}

function describeQuery(query) {
  const p = new URLSearchParams(query);
  const thresholds =
    p.get("thresholds") === "percentile" ? `class thresholds at percentile ${p.get("class_percentile")}` : "mean class thresholds";
  return `${thresholds}, out-of-distribution percentile ${p.get("ood_percentile")}, ${p.get("filter_by")}`;
}

function renderCategories() {
  const counts = state.result.categoryCounts;
  const n = state.dataset.n;
  const body = $("#categories tbody");
  body.innerHTML = CATEGORIES.map(
    (key, c) =>
      `<tr data-category="${key}"><th scope="row"><span class="cat-swatch cat-${c}"></span>${CATEGORY_TEXT[c]}` +
      ` <span class="help">(${CATEGORY_HELP[c]})</span></th>` +
      `<td class="count">${fmtInt(counts[c])}</td><td>${fmtPct(counts[c] / n)}</td>` +
      `<td class="bar-cell"><div class="bar cat-${c}"></div></td></tr>`,
  ).join("");
  const max = Math.max(...counts, 1);
  body.querySelectorAll(".bar").forEach((bar, c) => {
    bar.style.width = `${(100 * counts[c]) / max}%`;
  });
}

function buildHeatmap() {
  const { k } = state.dataset;
  const table = $("#joint");
  table.classList.toggle("compact", k >= COMPACT_FROM_K);
  const head = ['<thead><tr><th scope="col" class="corner">given ↓ / suggested →</th>'];
  for (let j = 0; j < k; j++) {
    const name = state.dataset.names ? state.dataset.names[j] : `class ${j}`;
    head.push(`<th scope="col" title="${escapeHtml(classLabel(j))}"><span class="idx">${j}</span> ${escapeHtml(name)}</th>`);
  }
  head.push('<th scope="col" class="row-total">row total</th></tr></thead>');
  const rows = ["<tbody>"];
  for (let i = 0; i < k; i++) {
    rows.push(`<tr><th scope="row">${escapeHtml(classLabel(i))}</th>`);
    for (let j = 0; j < k; j++) rows.push(`<td role="gridcell" data-i="${i}" data-j="${j}" tabindex="-1"></td>`);
    rows.push('<td class="row-total"></td></tr>');
  }
  rows.push("</tbody>");
  table.innerHTML = head.join("") + rows.join("");
  const first = table.querySelector('td[data-i="0"][data-j="0"]');
  if (first) first.tabIndex = 0;
  $("#cell-readout").textContent = "";
}

function cellText(i, j, count, share) {
  return `given ${className(i)}, suggested ${className(j)}: ${fmtInt(count)} examples, ${fmtPct(share)} of given ${className(i)}`;
}

function updateHeatmap() {
  const { k, values } = state.result.cj;
  const table = $("#joint");
  if (table.querySelectorAll("td[data-i]").length !== k * k) buildHeatmap();
  let max = 0;
  for (const v of values) max = Math.max(max, v);
  const scale = Math.log1p(Math.max(max, 1));
  $("#legend-max").textContent = fmtInt(max);
  const rowsEl = table.tBodies[0].rows;
  const compact = k >= COMPACT_FROM_K;
  for (let i = 0; i < k; i++) {
    let rowSum = 0;
    for (let j = 0; j < k; j++) rowSum += values[i * k + j];
    const cells = rowsEl[i].cells; // cells[0] is the row header
    for (let j = 0; j < k; j++) {
      const count = values[i * k + j];
      const share = rowSum ? count / rowSum : 0;
      const td = cells[j + 1];
      const rgb = count === 0 ? [255, 255, 255] : viridis(1 - Math.log1p(count) / scale);
      td.style.backgroundColor = `rgb(${rgb.join(",")})`;
      td.style.color = count === 0 ? "#595959" : textOn(rgb);
      td.dataset.count = String(count);
      td.dataset.share = String(share);
      const label = cellText(i, j, count, share);
      td.setAttribute("aria-label", label);
      td.title = label;
      td.innerHTML = compact ? "" : `${fmtInt(count)}<span class="share">${fmtPct(share)}</span>`;
      td.setAttribute("aria-selected", state.filter && state.filter.i === i && state.filter.j === j ? "true" : "false");
    }
    cells[k + 1].textContent = fmtInt(rowSum);
  }
}

function renderHealth() {
  const h = state.health;
  if (!h) return;
  $("#health-score").textContent = h.score.toFixed(4);
  $("#estimated-issues").textContent = fmtInt(h.numIssues);
  const head =
    '<caption class="visually-hidden">Per-class label quality</caption><thead><tr><th scope="col">Class</th>' +
    '<th scope="col">Label quality</th><th scope="col">Label issues</th><th scope="col">Inverse label issues</th>' +
    '<th scope="col">Label noise</th><th scope="col">Inverse label noise</th>' +
    '<th scope="col">Threshold</th><th scope="col">Out-of-distribution threshold</th></tr></thead>';
  const rows = Array.from(h.classIndex, (c, r) =>
    `<tr data-class="${c}"><th scope="row">${escapeHtml(classLabel(c))}</th><td>${fmtNum(h.labelQuality[r])}</td>` +
    `<td>${fmtInt(h.labelIssues[r])}</td><td>${fmtInt(h.inverseLabelIssues[r])}</td>` +
    `<td>${fmtNum(h.labelNoise[r])}</td><td>${fmtNum(h.inverseLabelNoise[r])}</td>` +
    '<td class="threshold"></td><td class="ood-threshold"></td></tr>',
  );
  $("#classes").innerHTML = `${head}<tbody>${rows.join("")}</tbody>`;
  const shown = Math.min(10, h.pairA.length);
  const pairRows = [];
  for (let r = 0; r < shown; r++) {
    pairRows.push(
      `<tr><th scope="row">${escapeHtml(classLabel(h.pairA[r]))} / ${escapeHtml(classLabel(h.pairB[r]))}</th>` +
      `<td>${fmtInt(h.pairCount[r])}</td><td>${fmtNum(h.pairJoint[r], 5)}</td></tr>`,
    );
  }
  $("#pairs").innerHTML =
    '<caption class="visually-hidden">Most confused pairs of classes</caption><thead><tr><th scope="col">Classes</th>' +
    '<th scope="col">Overlapping examples</th><th scope="col">Joint probability</th></tr></thead>' +
    `<tbody>${pairRows.join("")}</tbody>`;
  renderThresholds();
}

function renderThresholds() {
  const r = state.result;
  if (!r || !state.health) return;
  $("#classes").querySelectorAll("tbody tr").forEach((tr) => {
    const c = Number(tr.dataset.class);
    tr.querySelector(".threshold").textContent = fmtNum(r.thresholds[c]);
    tr.querySelector(".ood-threshold").textContent = fmtNum(r.oodThresholds[c]);
  });
}

function computeList() {
  const { ranked, suggested } = state.result;
  const labels = state.dataset.labels;
  const f = state.filter;
  const out = new Int32Array(ranked.length);
  let m = 0;
  for (let p = 0; p < ranked.length; p++) {
    const idx = ranked[p];
    if (!f || (labels[idx] === f.i && suggested[idx] === f.j)) out[m++] = p;
  }
  state.list = out.subarray(0, m);
}

function pageSize() {
  return Number($("#page-size").value);
}

function renderFlags() {
  const { ranked, suggested, score, category } = state.result;
  const labels = state.dataset.labels;
  const list = state.list;
  const size = pageSize();
  const pages = Math.max(1, Math.ceil(list.length / size));
  state.page = Math.min(Math.max(0, state.page), pages - 1);
  const start = state.page * size;
  const end = Math.min(list.length, start + size);
  const rows = [];
  for (let r = start; r < end; r++) {
    const p = list[r];
    const idx = ranked[p];
    rows.push(
      `<tr data-index="${idx}"><td>${p + 1}</td><td>${idx}</td><td>${escapeHtml(classLabel(labels[idx]))}</td>` +
      `<td>${escapeHtml(classLabel(suggested[idx]))}</td><td title="${score[idx]}">${fmtScore(score[idx])}</td>` +
      `<td>${CATEGORY_TEXT[category[idx]]}</td></tr>`,
    );
  }
  $("#flags tbody").innerHTML = rows.join("");
  $("#page-info").textContent = list.length
    ? `Rows ${fmtInt(start + 1)}–${fmtInt(end)} of ${fmtInt(list.length)} (page ${state.page + 1} of ${pages})`
    : "No flagged examples";
  $("#first-page").disabled = $("#prev-page").disabled = state.page === 0;
  $("#next-page").disabled = $("#last-page").disabled = state.page >= pages - 1;
  const f = state.filter;
  const total = state.result.ranked.length;
  if (f) {
    const cell = state.result.cj.values[f.i * state.result.cj.k + f.j];
    $("#filter-info").textContent =
      `${fmtInt(list.length)} of ${fmtInt(total)} flagged examples are given ${className(f.i)} and suggested ` +
      `${className(f.j)} (that confident-joint cell holds ${fmtInt(cell)}).`;
  } else {
    $("#filter-info").textContent = `All ${fmtInt(total)} flagged examples, lowest label quality score first.`;
  }
  $("#clear-filter").hidden = !f;
  const flags = $("#flags");
  flags.dataset.filter = f ? `${f.i},${f.j}` : "";
  flags.dataset.rows = String(list.length);
}

function setFilter(filter) {
  state.filter = filter;
  state.page = 0;
  if (!state.result) return;
  updateHeatmap();
  computeList();
  renderFlags();
}

// ------------------------------------------------------------------ CSV

function csvField(s) {
  const text = String(s);
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function csv() {
  const { ranked, suggested, score, category } = state.result;
  const labels = state.dataset.labels;
  const names = state.dataset.names;
  const lines = ["rank,index,given_label,given_name,suggested_label,suggested_name,label_quality_score,category"];
  for (const p of state.list) {
    const idx = ranked[p];
    const g = labels[idx];
    const s = suggested[idx];
    lines.push(
      [p + 1, idx, g, csvField(names ? names[g] : ""), s, csvField(names ? names[s] : ""), String(score[idx]), CATEGORIES[category[idx]]].join(","),
    );
  }
  return `${lines.join("\n")}\n`;
}

function download() {
  if (!state.result) return;
  const base = state.dataset.fileName.replace(/\.[^.]*$/, "") || "dataset";
  const f = state.filter;
  const name = `${base}-flags${f ? `-given${f.i}-suggested${f.j}` : ""}.csv`;
  const url = URL.createObjectURL(new Blob([csv()], { type: "text/csv" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// ------------------------------------------------------------------ events

function cellOf(target) {
  return target instanceof Element ? target.closest("td[data-i]") : null;
}

function focusCell(i, j) {
  const k = state.dataset.k;
  i = Math.min(k - 1, Math.max(0, i));
  j = Math.min(k - 1, Math.max(0, j));
  const table = $("#joint");
  const old = table.querySelector('td[tabindex="0"]');
  if (old) old.tabIndex = -1;
  const td = table.querySelector(`td[data-i="${i}"][data-j="${j}"]`);
  td.tabIndex = 0;
  td.focus();
  state.focus = { i, j };
}

function toggleCell(td) {
  const i = Number(td.dataset.i);
  const j = Number(td.dataset.j);
  const same = state.filter && state.filter.i === i && state.filter.j === j;
  setFilter(same ? null : { i, j });
}

function readout(td) {
  $("#cell-readout").textContent = td ? td.getAttribute("aria-label") || "" : "";
}

function wire() {
  const file = $("#file");
  file.addEventListener("change", () => {
    if (file.files.length) load(file.files[0]);
  });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) load(e.dataTransfer.files[0]);
  });
  // the whole page accepts a drop, so a near miss does not navigate away to the file
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files.length) load(e.dataTransfer.files[0]);
  });

  const classSlider = $("#class-percentile");
  classSlider.addEventListener("input", () => {
    $("#class-percentile-value").textContent = classSlider.value;
    $("#method-percentile").checked = true;
    scheduleRefresh();
  });
  const oodSlider = $("#ood-percentile");
  oodSlider.addEventListener("input", () => {
    $("#ood-percentile-value").textContent = oodSlider.value;
    scheduleRefresh();
  });
  for (const radio of document.querySelectorAll('input[name="method"]')) radio.addEventListener("change", scheduleRefresh);
  $("#filter-by").addEventListener("change", scheduleRefresh);
  $("#api-key-form").addEventListener("submit", (e) => {
    e.preventDefault(); // Enter in the key field: apply it, never navigate
    if (state.dataset) scheduleRefresh();
  });
  $("#api-key").addEventListener("change", () => {
    if (state.dataset && !$("#error").hidden) scheduleRefresh();
  });

  const table = $("#joint");
  table.addEventListener("click", (e) => {
    const td = cellOf(e.target);
    if (!td || !state.result) return;
    focusCell(Number(td.dataset.i), Number(td.dataset.j));
    toggleCell(td);
  });
  table.addEventListener("keydown", (e) => {
    const td = cellOf(e.target);
    if (!td || !state.result) return;
    const i = Number(td.dataset.i);
    const j = Number(td.dataset.j);
    const k = state.dataset.k;
    const moves = {
      ArrowUp: [i - 1, j], ArrowDown: [i + 1, j], ArrowLeft: [i, j - 1], ArrowRight: [i, j + 1],
      Home: [i, 0], End: [i, k - 1], PageUp: [0, j], PageDown: [k - 1, j],
    };
    if (moves[e.key]) {
      e.preventDefault();
      focusCell(...moves[e.key]);
    } else if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      toggleCell(td);
    } else if (e.key === "Escape") {
      setFilter(null);
    }
  });
  table.addEventListener("focusin", (e) => readout(cellOf(e.target)));
  table.addEventListener("mouseover", (e) => readout(cellOf(e.target)));

  $("#clear-filter").addEventListener("click", () => setFilter(null));
  $("#download").addEventListener("click", download);
  const go = (page) => () => {
    state.page = page();
    renderFlags();
  };
  $("#first-page").addEventListener("click", go(() => 0));
  $("#prev-page").addEventListener("click", go(() => state.page - 1));
  $("#next-page").addEventListener("click", go(() => state.page + 1));
  $("#last-page").addEventListener("click", go(() => Number.MAX_SAFE_INTEGER));
  $("#page-size").addEventListener("change", () => {
    state.page = 0;
    if (state.result) renderFlags();
  });
}

wire();
document.body.dataset.ready = "true";
