// instaflow: one-step text-to-image in the browser (WebGPU, with a wasm CPU fallback).
//
// `InstaFlow` runs in the calling thread; `InstaFlowWorker` has the same API and runs the model in
// a module Web Worker so the page stays responsive while an image is computed.

import initWasm, { InstaFlow as WasmInstaFlow, version as wasmVersion } from "./pkg/instaflow_wasm.js";

/** Components of a diffusers folder the model needs, and the weight file stems each may use
 * (the same order the Rust loader tries them in). */
const COMPONENTS = {
  text_encoder: ["model", "pytorch_model"],
  unet: ["diffusion_pytorch_model", "model"],
  vae: ["diffusion_pytorch_model", "model"],
};
const TOKENIZER_FILES = ["vocab.json", "merges.txt"];
const OPTIONAL_TOKENIZER_FILES = ["tokenizer_config.json", "special_tokens_map.json"];

/** Weights are held in wasm memory (≤ 4 GiB, and they are copied once while parsing); larger
 * folders are refused with a readable message instead of running out of memory half-way. */
const MAX_MODEL_BYTES = 1.5e9;

let wasmReady = null;

/** Load and instantiate the wasm module once (`wasm` overrides where it is fetched from). */
export function init(wasm) {
  wasmReady ??= initWasm(wasm ? { module_or_path: wasm } : undefined);
  return wasmReady;
}

/** The package version. */
export async function version() {
  await init();
  return wasmVersion();
}

/** Turn a wasm trap into the Rust panic message that caused it. */
function explain(error) {
  const panic = globalThis.__instaflowPanic;
  if (error instanceof WebAssembly.RuntimeError && panic) {
    globalThis.__instaflowPanic = undefined;
    const oom = /out of memory|OutOfMemory|memory allocation/i.test(panic);
    const e = new Error(
      oom
        ? `out of memory (GPU buffers or wasm heap): ${panic} — try a smaller model, or the CPU backend`
        : `internal error: ${panic}`,
    );
    e.fatal = true;
    return e;
  }
  if (error instanceof Error) return error;
  return new Error(String(error));
}

const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;

/** Fetch `url` with progress; `null` for 404 when `optional`. */
async function fetchBytes(url, name, optional, progress) {
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    throw new Error(`could not reach ${url} (${e.message ?? e})`);
  }
  if (!response.ok) {
    // An unread body keeps its connection busy; browsers allow only a few per server.
    await response.body?.cancel().catch(() => {});
    if (response.status === 404 && optional) return null;
    throw new Error(`${url}: HTTP ${response.status} ${response.statusText}`.trim());
  }
  const total = Number(response.headers.get("Content-Length")) || 0;
  progress.expect(name, total);
  if (!response.body) {
    const bytes = new Uint8Array(await response.arrayBuffer());
    progress.add(name, bytes.length);
    return bytes;
  }
  const reader = response.body.getReader();
  const chunks = [];
  let length = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    length += value.length;
    progress.add(name, value.length);
  }
  if (total && length !== total) throw new Error(`${url}: got ${length} of ${total} bytes (connection cut?)`);
  const bytes = new Uint8Array(length);
  let offset = 0;
  for (const c of chunks) {
    bytes.set(c, offset);
    offset += c.length;
  }
  return bytes;
}

/** Sums bytes over files and reports `{ file, loaded, total }` through `onProgress`. */
class Progress {
  constructor(onProgress) {
    this.onProgress = onProgress;
    this.totals = new Map();
    this.loaded = 0;
  }
  expect(file, total) {
    this.totals.set(file, total);
  }
  add(file, n) {
    this.loaded += n;
    const total = [...this.totals.values()].reduce((a, b) => a + b, 0);
    this.onProgress?.({ file, loaded: this.loaded, total: Math.max(total, this.loaded) });
  }
}

/** Which files of a folder listing the loader reads: configs, the tokenizer, and per component
 * the first weight stem present (single file, or an index and its shards). */
export function selectFiles(names) {
  const have = new Set(names);
  const wanted = ["model_index.json"].filter((n) => have.has(n));
  for (const f of [...TOKENIZER_FILES, ...OPTIONAL_TOKENIZER_FILES]) {
    if (have.has(`tokenizer/${f}`)) wanted.push(`tokenizer/${f}`);
  }
  for (const [dir, stems] of Object.entries(COMPONENTS)) {
    if (have.has(`${dir}/config.json`)) wanted.push(`${dir}/config.json`);
    for (const stem of stems) {
      if (have.has(`${dir}/${stem}.safetensors`)) {
        wanted.push(`${dir}/${stem}.safetensors`);
        break;
      }
      if (have.has(`${dir}/${stem}.safetensors.index.json`)) {
        wanted.push(`${dir}/${stem}.safetensors.index.json`);
        wanted.push(...names.filter((n) => n.startsWith(`${dir}/${stem}-`) && n.endsWith(".safetensors")));
        break;
      }
    }
  }
  return wanted;
}

/** The files of a model folder at URL `base`, read as model_index.json describes it. */
async function filesFromUrl(base, progress) {
  const absolute = new URL(base, globalThis.location?.href).href;
  const root = absolute.endsWith("/") ? absolute : `${absolute}/`;
  const get = (name, optional = false) => fetchBytes(new URL(name, root).href, name, optional, progress);
  const indexBytes = await get("model_index.json", true);
  if (!indexBytes) throw new Error(`${root}model_index.json not found: is ${root} a diffusers model folder?`);
  let index;
  try {
    index = JSON.parse(new TextDecoder().decode(indexBytes));
  } catch (e) {
    throw new Error(`${root}model_index.json is not valid JSON (${e.message})`);
  }
  const files = { "model_index.json": indexBytes };
  const jobs = [];
  for (const f of TOKENIZER_FILES) jobs.push(get(`tokenizer/${f}`).then((b) => (files[`tokenizer/${f}`] = b)));
  for (const f of OPTIONAL_TOKENIZER_FILES) {
    jobs.push(get(`tokenizer/${f}`, true).then((b) => b && (files[`tokenizer/${f}`] = b)));
  }
  for (const [dir, stems] of Object.entries(COMPONENTS)) {
    if (!(dir in index)) continue; // pixel-space models have no vae
    jobs.push(
      (async () => {
        files[`${dir}/config.json`] = await get(`${dir}/config.json`);
        for (const stem of stems) {
          const single = await get(`${dir}/${stem}.safetensors`, true);
          if (single) {
            files[`${dir}/${stem}.safetensors`] = single;
            return;
          }
          const shardIndex = await get(`${dir}/${stem}.safetensors.index.json`, true);
          if (shardIndex) {
            files[`${dir}/${stem}.safetensors.index.json`] = shardIndex;
            const map = JSON.parse(new TextDecoder().decode(shardIndex)).weight_map ?? {};
            for (const shard of new Set(Object.values(map))) files[`${dir}/${shard}`] = await get(`${dir}/${shard}`);
            return;
          }
        }
        throw new Error(`${root}${dir}/: no weights (${stems.map((s) => `${s}.safetensors`).join(" or ")})`);
      })(),
    );
  }
  await Promise.all(jobs);
  return files;
}

/** The files of a map `name → URL | ArrayBuffer | typed array | Blob`. */
async function filesFromMap(map, progress) {
  const entries = map instanceof Map ? [...map.entries()] : Object.entries(map);
  const names = selectFiles(entries.map(([n]) => n));
  const byName = new Map(entries);
  const total = names.reduce((sum, n) => sum + (byName.get(n)?.size ?? byName.get(n)?.byteLength ?? 0), 0);
  if (total > MAX_MODEL_BYTES) {
    throw new Error(
      `this model's files are ${mb(total)}; the browser build keeps weights in wasm memory and ` +
        `handles up to ${mb(MAX_MODEL_BYTES)} (SD-1.5-size models do not fit yet)`,
    );
  }
  const files = {};
  await Promise.all(
    names.map(async (name) => {
      const value = byName.get(name);
      if (typeof value === "string" || value instanceof URL) {
        files[name] = await fetchBytes(String(value), name, false, progress);
      } else if (typeof Blob !== "undefined" && value instanceof Blob) {
        progress.expect(name, value.size);
        files[name] = new Uint8Array(await value.arrayBuffer());
        progress.add(name, value.size);
      } else if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) {
        const bytes = value instanceof ArrayBuffer ? new Uint8Array(value) : new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
        progress.expect(name, bytes.length);
        files[name] = bytes;
        progress.add(name, bytes.length);
      } else {
        throw new Error(`file ${name}: expected a URL, ArrayBuffer, typed array or Blob`);
      }
    }),
  );
  return files;
}

/** A text-to-image model running in this thread. */
export class InstaFlow {
  #model;
  #queue = Promise.resolve();
  #broken = null;

  constructor(model) {
    this.#model = model;
  }

  /**
   * Load a model: `source` is the URL of a diffusers folder, or a map of file name → URL |
   * ArrayBuffer | typed array | Blob (e.g. the files of a folder picker, names relative to it).
   */
  static async load(source, { onProgress, backend = "auto", wasm } = {}) {
    await init(wasm);
    const progress = new Progress(onProgress);
    const files =
      typeof source === "string" || source instanceof URL
        ? await filesFromUrl(String(source), progress)
        : await filesFromMap(source ?? {}, progress);
    try {
      return new InstaFlow(await WasmInstaFlow.fromFiles(files, backend));
    } catch (e) {
      throw explain(e);
    }
  }

  /** `"webgpu"` or `"cpu"`. */
  get backend() {
    return this.#model.backend;
  }

  /** `[1, C, h, w]`: the shape of `noise` for `generate`. */
  get noiseShape() {
    return Array.from(this.#model.noiseShape);
  }

  /** Generate one image; calls run one after another. */
  generate({ prompt, seed = 0, noise, guidance = 1, steps = 1, latents = false } = {}) {
    const run = async () => {
      if (this.#broken) throw this.#broken;
      if (typeof prompt !== "string") throw new Error("generate: `prompt` must be a string");
      if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) throw new Error("generate: `seed` must be an integer in [0, 2^32)");
      if (!Number.isInteger(steps) || steps < 1 || steps > 1000) throw new Error("generate: `steps` must be an integer in [1, 1000]");
      if (!Number.isFinite(guidance)) throw new Error("generate: `guidance` must be a finite number");
      if (noise !== undefined && !(noise instanceof Float32Array)) throw new Error("generate: `noise` must be a Float32Array");
      let image;
      try {
        image = await this.#model.generate(prompt, seed, noise, steps, guidance, latents);
      } catch (e) {
        const error = explain(e);
        if (error.fatal) this.#broken = new Error(`${error.message} (load the model again)`);
        throw error;
      }
      const result = {
        width: image.width,
        height: image.height,
        rgba: image.rgba,
        backend: image.backend,
        timings: { encodeMs: image.encodeMs, unetMs: image.unetMs, decodeMs: image.decodeMs, totalMs: image.totalMs },
      };
      if (latents) result.latents = image.latents;
      image.free();
      return result;
    };
    const next = this.#queue.then(run, run);
    this.#queue = next.catch(() => {});
    return next;
  }

  /** Release the model's memory (GPU buffers and wasm heap). */
  free() {
    this.#model?.free();
    this.#model = null;
  }
}

/** The same API as `InstaFlow`, with the model in a module Web Worker (`./worker.js`). */
export class InstaFlowWorker {
  #worker;
  #pending = new Map();
  #next = 0;
  backend;
  noiseShape;

  constructor(worker) {
    this.#worker = worker;
    worker.onmessage = ({ data }) => {
      const call = this.#pending.get(data.id);
      if (!call) return;
      if (data.progress) return call.onProgress?.(data.progress);
      this.#pending.delete(data.id);
      if (data.error) call.reject(Object.assign(new Error(data.error), { fatal: data.fatal }));
      else call.resolve(data.result);
    };
    worker.onerror = (e) => {
      const error = new Error(`the model worker failed: ${e.message ?? "unknown error"}`);
      for (const call of this.#pending.values()) call.reject(error);
      this.#pending.clear();
    };
  }

  #call(message, onProgress, transfer = []) {
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, onProgress });
      this.#worker.postMessage({ id, ...message }, transfer);
    });
  }

  /** Start a worker and load `source` in it (see `InstaFlow.load`). */
  static async load(source, { onProgress, backend = "auto", wasm, worker } = {}) {
    const w = worker ?? new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
    const proxy = new InstaFlowWorker(w);
    // Relative URLs are resolved here: the worker's base URL is its script's.
    const absolute = (u) => (typeof u === "string" || u instanceof URL ? new URL(String(u), globalThis.location?.href).href : u);
    const src =
      typeof source === "string" || source instanceof URL
        ? absolute(source)
        : Object.fromEntries((source instanceof Map ? [...source.entries()] : Object.entries(source ?? {})).map(([k, v]) => [k, absolute(v)]));
    try {
      const info = await proxy.#call({ op: "load", source: src, backend, wasm: wasm && absolute(wasm) }, onProgress);
      proxy.backend = info.backend;
      proxy.noiseShape = info.noiseShape;
    } catch (e) {
      w.terminate();
      throw e;
    }
    return proxy;
  }

  /** See `InstaFlow.generate`. */
  generate(options = {}) {
    return this.#call({ op: "generate", options });
  }

  /** Stop the worker and free the model. */
  free() {
    this.#worker.terminate();
    for (const call of this.#pending.values()) call.reject(new Error("the model was freed"));
    this.#pending.clear();
  }
}
