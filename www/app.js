// The instaflow page: the image follows the prompt as it is typed. Requests are debounced, and at
// most one generation runs at a time; while it runs only the newest request is kept (older ones
// are dropped, never queued), so the image catches up with the text instead of lagging behind it.
//
// `window.instaflowPage` exposes the page's state (used by the browser tests, handy in devtools).

import { InstaFlowWorker, clearCache, storageEstimate } from "/instaflow/index.js";

const BUILTIN = new URL("/models/instaflow-shapes/", location.href).href;
/** The published InstaFlow-0.9B (diffusers layout on the Hugging Face Hub); `?hub=` points the
 * page at another Hub endpoint (a mirror, or a local test server). */
const INSTAFLOW_09B = "hf:XCLiu/instaflow_0_9B_from_sd_1_5";
const DEBOUNCE_MS = 120;
const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);

const page = (window.instaflowPage = {
  state: "loading", // loading | ready | generating | stopped | error | cancelled
  crashes: 0, // model worker crashes (each one replaced on the next request)
  backend: null,
  requests: 0, // debounced requests made
  generations: 0, // generations started
  log: [], // per generation: { request: its number, newest: the newest request when it started }
  last: null, // { prompt, seed, guidance, steps, width, height, rgba, timings }
  error: null,
});

let model = null;
let loads = 0; // a newer load makes older ones stale
let cancelLoad = null; // aborts the load in progress
let running = false;
let stopGeneration = null; // aborts the generation in progress
let wanted = null;
let timer = null;

function showError(message) {
  page.error = message;
  page.state = "error";
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  page.error = null;
  $("error").hidden = true;
}

function params() {
  const seed = Number($("seed").value);
  const guidance = Number($("guidance").value);
  const steps = Number($("steps").value);
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) throw new Error("Seed must be a whole number from 0 to 4294967295.");
  if (!Number.isFinite(guidance)) throw new Error("Guidance must be a number.");
  if (!Number.isInteger(steps) || steps < 1 || steps > 50) throw new Error("Steps must be a whole number from 1 to 50.");
  return { prompt: $("prompt").value, seed, guidance, steps };
}

const same = (a, b) => a && b && a.prompt === b.prompt && a.seed === b.seed && a.guidance === b.guidance && a.steps === b.steps;

/** Ask for an image with the current inputs, after the user pauses for DEBOUNCE_MS. */
function request({ now = false } = {}) {
  clearTimeout(timer);
  timer = setTimeout(
    () => {
      try {
        wanted = { ...params(), request: page.requests + 1 };
      } catch (e) {
        return showError(e.message);
      }
      page.requests++;
      pump();
    },
    now ? 0 : DEBOUNCE_MS,
  );
}

/** Run the newest wanted request if nothing is running. */
async function pump() {
  if (running || !model || !wanted) return;
  const job = wanted;
  wanted = null;
  if (same(job, page.last)) return;
  running = true;
  page.state = "generating";
  page.generations++;
  page.log.push({ request: job.request, newest: page.requests });
  const current = model;
  const controller = new AbortController();
  stopGeneration = controller;
  $("stop").hidden = false;
  try {
    const { prompt, seed, guidance, steps } = job;
    const image = await current.generate({ prompt, seed, guidance, steps, signal: controller.signal });
    if (current !== model) return; // the model was switched meanwhile
    show(image, job);
    clearError();
    if (image.recoveredFrom) {
      const why = /GPU device was lost/.test(image.recoveredFrom) ? "the GPU device was lost" : "a crash";
      $("load-status").textContent += ` · restarted after ${why}`;
    }
    page.state = "ready";
  } catch (e) {
    if (current !== model) return;
    if (e.name === "AbortError") {
      page.state = "stopped";
      $("timing").textContent = "stopped";
      page.last = null;
    } else if (e.crashed) {
      // The worker is replaced on the next request; the page stays usable.
      showError(`The model stopped (${e.message}). It restarts with the next image.`);
      page.last = null;
    } else {
      showError(`Generation failed: ${e.message}`);
      if (e.fatal) {
        model.free();
        model = null;
      }
    }
  } finally {
    running = false;
    stopGeneration = null;
    $("stop").hidden = true;
    if (model) pump();
  }
}

function show(image, job) {
  const canvas = $("image");
  canvas.width = image.width;
  canvas.height = image.height;
  canvas.getContext("2d").putImageData(new ImageData(image.rgba, image.width, image.height), 0, 0);
  const t = image.timings;
  $("timing").textContent = `${t.totalMs.toFixed(0)} ms per image · ${image.backend === "webgpu" ? "WebGPU" : "CPU (wasm)"}`;
  $("timing-detail").textContent =
    `text encoder ${t.encodeMs.toFixed(0)} ms · UNet ${t.unetMs.toFixed(0)} ms · decode ${t.decodeMs.toFixed(0)} ms · ${image.width}×${image.height}`;
  $("download").disabled = false;
  page.last = { prompt: job.prompt, seed: job.seed, guidance: job.guidance, steps: job.steps, width: image.width, height: image.height, rgba: Array.from(image.rgba), timings: t, backend: image.backend };
}

const mb = (n) => (n / 1e6).toFixed(1);

/** The prompts a model was trained to know (`prompts.json` in its folder: [{ prompt, class }]),
 * as clickable chips under the prompt; none when the folder has no such list. */
async function showExamples(source) {
  const box = $("examples");
  box.replaceChildren();
  box.hidden = true;
  page.examples = [];
  let list = null;
  try {
    if (typeof source === "string" && !source.startsWith("hf:")) {
      const response = await fetch(new URL("prompts.json", source.endsWith("/") ? source : `${source}/`));
      if (response.ok) list = await response.json();
    } else if (source && typeof source === "object" && source["prompts.json"]) {
      list = JSON.parse(await source["prompts.json"].text());
    }
  } catch {
    list = null; // a missing or unreadable list only means no examples
  }
  if (!Array.isArray(list)) return;
  page.examples = list.map((e) => String(e.prompt ?? e)).filter((p) => p.length > 0);
  for (const prompt of page.examples) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.textContent = prompt;
    chip.addEventListener("click", () => {
      $("prompt").value = prompt;
      markExample();
      request({ now: true });
    });
    box.append(chip);
  }
  box.hidden = page.examples.length === 0;
  markExample();
}

/** Highlight the chip of the prompt being shown, if it is one. */
function markExample() {
  for (const chip of $("examples").children) chip.classList.toggle("current", chip.textContent === $("prompt").value);
}

function loadingText(label, { loaded, total, bytesPerSecond, secondsLeft }) {
  let text = `loading ${label}: ${mb(loaded)} / ${mb(total)} MB`;
  if (bytesPerSecond > 0) text += ` · ${mb(bytesPerSecond)} MB/s`;
  if (secondsLeft !== null && secondsLeft !== undefined && loaded < total) text += ` · ${Math.ceil(secondsLeft)} s left`;
  return text;
}

/** Show how much this browser keeps for the page (downloaded models are most of it). */
async function showStorage() {
  const estimate = await storageEstimate().catch(() => null);
  $("storage").textContent = estimate
    ? `Stored by this page: ${mb(estimate.usage ?? 0)} MB of ${mb(estimate.quota ?? 0)} MB available.`
    : "";
}

/** Load a model (a URL, a Hub id, or a map of files) and generate with the current inputs. */
async function load(source, label) {
  const token = ++loads;
  cancelLoad?.abort();
  model?.free();
  model = null;
  page.state = "loading";
  page.last = null;
  clearError();
  $("big-model").hidden = true;
  const bar = $("progress");
  bar.hidden = false;
  bar.value = 0;
  $("load-status").textContent = `loading ${label}…`;
  $("timing").textContent = "loading…";
  const controller = new AbortController();
  cancelLoad = controller;
  $("cancel").hidden = false;
  try {
    const loaded = await InstaFlowWorker.load(source, {
      backend: $("backend").value,
      signal: controller.signal,
      hfEndpoint: query.get("hub") ?? undefined,
      onProgress: (p) => {
        if (token !== loads) return;
        bar.value = p.total ? p.loaded / p.total : 0;
        $("load-status").textContent = loadingText(label, p);
      },
    });
    if (token !== loads) return loaded.free();
    model = loaded;
    loaded.onCrash = (e) => {
      page.crashes++;
      if (!running) showError(`The model stopped (${e.message}). It restarts with the next image.`);
    };
    page.backend = loaded.backend;
    page.precision = loaded.precision;
    page.loadStats = loaded.loadStats;
    page.state = "ready";
    // f16 where the GPU has f16 shaders; f32 otherwise and on the CPU.
    $("load-status").textContent = `${label} · ${loaded.backend === "webgpu" ? "WebGPU" : "CPU (wasm)"}, ${loaded.precision}`;
    request({ now: true });
    showExamples(source);
  } catch (e) {
    if (token !== loads) return;
    $("load-status").textContent = "";
    $("timing").textContent = "no model";
    if (e.name === "AbortError") {
      page.state = "cancelled";
      $("load-status").textContent = `loading ${label} was cancelled`;
    } else {
      showError(`Could not load ${label}: ${e.message}`);
    }
  } finally {
    if (token === loads) {
      bar.hidden = true;
      $("cancel").hidden = true;
      cancelLoad = null;
      showStorage();
    }
  }
}

/** The files of a folder chosen with the picker, named relative to the folder itself. */
function folderFiles(fileList) {
  const files = {};
  for (const f of fileList) {
    const rel = f.webkitRelativePath || f.name;
    files[rel.includes("/") ? rel.slice(rel.indexOf("/") + 1) : rel] = f;
  }
  return files;
}

let folderLoaded = false;

function loadSelected() {
  if ($("model").value === "folder") return $("folder").click();
  if ($("model").value === "instaflow-0.9b") {
    // Several GB: say so, and wait for the user to agree, before the download starts.
    $("big-model").hidden = false;
    return;
  }
  folderLoaded = false;
  load(query.get("model") ? new URL(query.get("model"), location.href).href : BUILTIN, query.get("model") ?? "the built-in shapes model");
}

$("model").addEventListener("change", loadSelected);
$("big-model-go").addEventListener("click", () => load(INSTAFLOW_09B, "InstaFlow-0.9B"));
$("big-model-back").addEventListener("click", () => {
  $("model").value = "builtin";
  loadSelected();
});
$("cancel").addEventListener("click", () => cancelLoad?.abort());
$("stop").addEventListener("click", () => stopGeneration?.abort());
$("clear-cache").addEventListener("click", async () => {
  await clearCache();
  showStorage();
});
$("backend").addEventListener("change", () => {
  if ($("model").value === "folder" && $("folder").files.length) load(folderFiles($("folder").files), "your folder");
  else loadSelected();
});
// Closing the folder picker without a choice goes back to the model in use.
$("folder").addEventListener("cancel", () => {
  if (!folderLoaded) $("model").value = "builtin";
});
$("folder").addEventListener("change", () => {
  const list = $("folder").files;
  if (!list.length) return;
  const name = (list[0].webkitRelativePath || "").split("/")[0] || "your folder";
  folderLoaded = true;
  load(folderFiles(list), name);
});
for (const id of ["prompt", "seed", "guidance", "steps"]) $(id).addEventListener("input", () => request());
$("prompt").addEventListener("input", markExample);
// Smooth (bilinear) enlargement shows the picture; nearest shows the model's actual pixels.
const smoothing = () => $("image").classList.toggle("smooth", $("smooth").checked);
$("smooth").addEventListener("change", smoothing);
smoothing();
$("new-seed").addEventListener("click", () => {
  $("seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
  request({ now: true });
});
$("download").addEventListener("click", () => {
  // Enlarge small images so the file is useful as a picture (smoothly or not, as shown).
  const src = $("image");
  const scale = Math.max(1, Math.floor(256 / Math.max(src.width, src.height)));
  const out = document.createElement("canvas");
  out.width = src.width * scale;
  out.height = src.height * scale;
  const ctx = out.getContext("2d");
  ctx.imageSmoothingEnabled = $("smooth").checked;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(src, 0, 0, out.width, out.height);
  out.toBlob((blob) => {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `${($("prompt").value.trim() || "instaflow").replace(/[^\w-]+/g, "_").slice(0, 60)}-${$("seed").value}.png`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
  }, "image/png");
});

if (query.get("backend")) $("backend").value = query.get("backend");
loadSelected();
