// The web page at /ui: classify image files with POST /classify and show the model's facts from GET /info.
// Whatever comes from the server or a file name is shown with textContent, never parsed as markup.
"use strict";

const IN_FLIGHT = 3;                          // /classify requests at once, one file each
const TOKEN_KEY = "cifar100-api-token";       // sessionStorage: forgotten when the tab closes
const HEIC = /\.(heic|heif)$/i;               // Pillow cannot read it: say so without a round trip

const queue = [];            // jobs {file, card} waiting for a free request slot
const heldForToken = [];     // jobs refused with 401, sent again once a token is accepted
let inFlight = 0;

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// The API's own words for a refusal ({"error": "..."}), without the field name of our single upload.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return String(body.error).replace(/^images(\[0\])?: /, "");
  } catch (_) { /* not JSON: fall back to the status */ }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

// ---- the model's facts -------------------------------------------------------------------------------------

function percent(fraction) {
  return `${(fraction * 100).toFixed(1)} %`;
}

function showFacts(info) {
  const meta = info.metadata || {};
  const batching = info.batching || {};
  const facts = [
    ["model", info.model],
    ["architecture", `${meta.arch} (${meta.part}), input ${meta.resolution} px`],
    ["classes", meta.classes ? meta.classes.length : undefined],
    ["test accuracy (measured)", typeof meta.test_acc === "number" ? percent(meta.test_acc) : undefined],
    ["test-time augmentation", meta.tta !== "none" ? meta.tta : undefined],   // "none": exported without it
    ["backend", info.backend],
    ["device", `${info.device}, ${info.precision}`],
    ["processes", batching.processes],
    ["workers", Array.isArray(info.workers) ? info.workers.length : undefined],
    ["largest upload", batching.max_body_bytes ? `${Math.floor(batching.max_body_bytes / 2 ** 20)} MB` : undefined],
  ];
  const list = $("model-facts");
  list.replaceChildren();
  for (const [label, value] of facts) {
    if (value === undefined || value === null || value === "") continue;
    const item = element("div");
    item.append(element("dt", "", label), element("dd", "", String(value)));
    list.append(item);
  }
  list.hidden = false;
  $("model-status").textContent = "";
}

async function loadInfo() {
  let response;
  try {
    response = await fetch("info", { headers: authHeaders() });
  } catch (error) {
    $("model-status").textContent = `Cannot reach the service (${error.message}).`;
    return;
  }
  if (response.status === 401) return askForToken(await errorText(response));
  if (!response.ok) {
    $("model-status").textContent = `The service did not describe its model: ${await errorText(response)}`;
    return;
  }
  $("token-form").hidden = true;
  showFacts(await response.json());
  queue.push(...heldForToken.splice(0));
  pump();
}

// ---- the token ---------------------------------------------------------------------------------------------

function askForToken(reason) {
  if (sessionStorage.getItem(TOKEN_KEY) !== null) {   // a token was sent: it is the wrong one
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-error").textContent = reason;
  }
  $("model-status").textContent = "Enter the service's API token to use it.";
  $("token-form").hidden = false;
  $("token").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("token-error").textContent = "";
  loadInfo();
});

// ---- one card per file -------------------------------------------------------------------------------------

function makeCard(file) {
  const card = element("li", "card");
  const thumb = element("img", "thumb");
  thumb.alt = `preview of ${file.name}`;
  const url = URL.createObjectURL(file);
  thumb.addEventListener("load", () => URL.revokeObjectURL(url));
  thumb.addEventListener("error", () => {      // e.g. TIFF: the API reads it, most browsers cannot show it
    URL.revokeObjectURL(url);
    thumb.replaceWith(element("div", "thumb placeholder", "no preview"));
  });
  thumb.src = url;
  const body = element("div", "card-body");
  body.append(element("p", "file-name", file.name), element("p", "status", "waiting…"));
  card.append(thumb, body);
  return card;
}

function setStatus(card, text) {
  card.querySelector(".status").textContent = text;
}

function showError(card, message, retry) {
  setStatus(card, "");
  const error = element("p", "error", message);
  error.setAttribute("role", "alert");
  if (retry) {
    const again = element("button", "retry", "Try again");
    again.type = "button";
    again.addEventListener("click", () => { error.remove(); retry(); });
    error.append(" ", again);
  }
  card.querySelector(".card-body").append(error);
}

function showPrediction(card, prediction) {
  setStatus(card, "");
  const top5 = element("ol", "top5");
  top5.setAttribute("aria-label", "five most likely classes");
  for (const candidate of prediction.top5) {
    const row = element("li");
    const bar = element("span", "bar");
    bar.setAttribute("aria-hidden", "true");
    const fill = element("span", "fill");
    fill.style.width = `${Math.max(0, Math.min(100, candidate.probability * 100))}%`;
    bar.append(fill);
    row.append(element("span", "class-name", candidate.class_name),
               element("span", "probability", percent(candidate.probability)), bar);
    top5.append(row);
  }
  const body = card.querySelector(".card-body");
  body.append(top5);
  if (prediction.note) body.append(element("p", "note", prediction.note));
}

// ---- requests ----------------------------------------------------------------------------------------------

async function classify(job) {
  const { file, card } = job;
  if (HEIC.test(file.name)) {
    return showError(card, "HEIC is not supported: export the photo as JPEG and choose that");
  }
  setStatus(card, "classifying…");
  const form = new FormData();
  form.append("images", file, file.name);
  let response;
  try {
    response = await fetch("classify", { method: "POST", headers: authHeaders(), body: form });
  } catch (error) {
    return showError(card, `could not reach the service (${error.message})`, () => enqueue([job]));
  }
  if (response.ok) return showPrediction(card, (await response.json()).predictions[0]);
  if (response.status === 401) {
    setStatus(card, "waiting for the API token…");
    heldForToken.push(job);
    return askForToken(await errorText(response));
  }
  if (response.status === 503) {
    const seconds = response.headers.get("Retry-After");
    const when = seconds ? `in ${seconds} s` : "shortly";
    return showError(card, `server busy, try again ${when}`, () => enqueue([job]));
  }
  showError(card, await errorText(response));
}

function pump() {
  while (inFlight < IN_FLIGHT && queue.length) {
    const job = queue.shift();
    inFlight += 1;
    classify(job)
      .catch((error) => showError(job.card, `unexpected answer (${error.message})`))
      .finally(() => { inFlight -= 1; pump(); });
  }
}

function enqueue(jobs) {
  for (const job of jobs) setStatus(job.card, "waiting…");
  queue.push(...jobs);
  pump();
}

function addFiles(files) {
  const jobs = Array.from(files, (file) => ({ file, card: makeCard(file) }));
  $("results").prepend(...jobs.map((job) => job.card));   // the newest files first, in the order chosen
  enqueue(jobs);
}

// ---- choosing and dropping ---------------------------------------------------------------------------------

$("files").addEventListener("change", (event) => {
  addFiles(event.target.files);
  event.target.value = "";   // the same file can be chosen again
});

// The whole page takes drops, so a file dropped beside the zone is classified instead of opened by the browser.
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  document.body.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (event.relatedTarget === null) document.body.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  document.body.classList.remove("dragging");
  if (event.dataTransfer.files.length) addFiles(event.dataTransfer.files);
});

loadInfo();
