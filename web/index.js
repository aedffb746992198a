// instaflow: one-step text-to-image in the browser (WebGPU, with a wasm CPU fallback).
//
// `InstaFlow` runs in the calling thread; `InstaFlowWorker` has the same API and runs the model in
// a module Web Worker so the page stays responsive while an image is computed.

import initWasm, { Loader as WasmLoader, version as wasmVersion } from "./pkg/instaflow_wasm.js";
import { loadModel, clearCache, storageEstimate, resolveModelUrl } from "./loader.js";

export { clearCache, storageEstimate, resolveModelUrl };

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

/** Peak size of this thread's wasm memory so far, in bytes (wasm memory only grows). */
export function wasmMemoryBytes() {
  return wasmMemory?.buffer.byteLength ?? 0;
}
let wasmMemory = null;

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

/** A text-to-image model running in this thread. */
export class InstaFlow {
  #model;
  #queue = Promise.resolve();
  #broken = null;

  constructor(model, stats) {
    this.#model = model;
    this.loadStats = stats;
  }

  /**
   * Load a model: `source` is the URL of a diffusers folder, an `hf:ORG/NAME[@REV]` id (Hugging
   * Face Hub), or a map of file name → URL | ArrayBuffer | typed array | Blob (e.g. the files of a
   * folder picker, names relative to it). Weights stream piece by piece to the device; URL
   * downloads are cached. `signal` (an `AbortSignal`) cancels the load. `precision` (WebGPU):
   * `"auto"` computes in f16 where the adapter has `shader-f16` (half the GPU memory), else f32.
   */
  static async load(source, { onProgress, backend = "auto", precision = "auto", wasm, signal, cache = true, hfEndpoint, pieceBytes, requestBytes } = {}) {
    const exports = await init(wasm);
    wasmMemory = exports.memory;
    try {
      const { model, stats } = await loadModel(WasmLoader, source, { onProgress, backend, precision, signal, cache, hfEndpoint, pieceBytes, requestBytes });
      stats.wasmMemoryBytes = wasmMemoryBytes();
      return new InstaFlow(model, stats);
    } catch (e) {
      throw explain(e);
    }
  }

  /** `"webgpu"` or `"cpu"`. */
  get backend() {
    return this.#model.backend;
  }

  /** `"f16"` or `"f32"`: the float type of the computation. */
  get precision() {
    return this.#model.precision;
  }

  /** `[1, C, h, w]`: the shape of `noise` for `generate`. */
  get noiseShape() {
    return Array.from(this.#model.noiseShape);
  }

  /** Generate one image; calls run one after another. */
  generate({ prompt, seed = 0, noise, guidance = 1, steps = 1, latents = false, width = 0, height = 0 } = {}) {
    const run = async () => {
      if (this.#broken) throw this.#broken;
      if (typeof prompt !== "string") throw new Error("generate: `prompt` must be a string");
      if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) throw new Error("generate: `seed` must be an integer in [0, 2^32)");
      if (!Number.isInteger(steps) || steps < 1 || steps > 1000) throw new Error("generate: `steps` must be an integer in [1, 1000]");
      if (!Number.isFinite(guidance)) throw new Error("generate: `guidance` must be a finite number");
      if (noise !== undefined && !(noise instanceof Float32Array)) throw new Error("generate: `noise` must be a Float32Array");
      for (const [k, v] of [["width", width], ["height", height]]) {
        if (!Number.isInteger(v) || v < 0 || v > 4096) throw new Error(`generate: \`${k}\` must be a whole number of pixels up to 4096 (0: the model's size)`);
      }
      let image;
      try {
        image = await this.#model.generate(prompt, seed, noise, steps, guidance, latents, width, height);
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
        precision: this.#model.precision,
        timings: { encodeMs: image.encodeMs, unetMs: image.unetMs, decodeMs: image.decodeMs, totalMs: image.totalMs },
        wasmMemoryBytes: wasmMemoryBytes(),
      };
      if (latents) result.latents = image.latents;
      image.free();
      return result;
    };
    const next = this.#queue.then(run, run);
    this.#queue = next.catch(() => {});
    return next;
  }

  /** Release the model's memory (GPU buffers and wasm heap). Generations already queued fail. */
  free() {
    this.#model?.free();
    this.#model = null;
    this.#broken = new Error("the model was freed");
  }
}

/** The same API as `InstaFlow`, with the model in a module Web Worker (`./worker.js`). */
export class InstaFlowWorker {
  #worker;
  #pending = new Map();
  #next = 0;
  backend;
  precision;
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

  /** Start a worker and load `source` in it (see `InstaFlow.load`); `signal` stops the worker. */
  static async load(source, { onProgress, backend = "auto", precision = "auto", wasm, worker, signal, cache = true, hfEndpoint, pieceBytes, requestBytes } = {}) {
    if (signal?.aborted) throw Object.assign(new Error("loading was cancelled"), { name: "AbortError" });
    const w = worker ?? new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
    const proxy = new InstaFlowWorker(w);
    // Relative URLs are resolved here: the worker's base URL is its script's.
    const absolute = (u) => (typeof u === "string" || u instanceof URL ? new URL(String(u), globalThis.location?.href).href : u);
    const src =
      typeof source === "string" || source instanceof URL
        ? absolute(source)
        : Object.fromEntries((source instanceof Map ? [...source.entries()] : Object.entries(source ?? {})).map(([k, v]) => [k, absolute(v)]));
    // Cancelling a load in a worker ends the worker: its fetches stop and its memory is returned.
    const onAbort = () => proxy.#fail(Object.assign(new Error("loading was cancelled"), { name: "AbortError" }));
    signal?.addEventListener("abort", onAbort);
    try {
      const info = await proxy.#call({ op: "load", source: src, backend, precision, wasm: wasm && absolute(wasm), cache, hfEndpoint, pieceBytes, requestBytes }, onProgress);
      proxy.backend = info.backend;
      proxy.precision = info.precision;
      proxy.noiseShape = info.noiseShape;
      proxy.loadStats = info.loadStats;
    } catch (e) {
      w.terminate();
      throw e;
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
    return proxy;
  }

  /** See `InstaFlow.generate`. */
  generate(options = {}) {
    return this.#call({ op: "generate", options });
  }

  /** Stop the worker and free the model. */
  free() {
    this.#fail(new Error("the model was freed"));
  }

  #fail(error) {
    this.#worker.terminate();
    for (const call of this.#pending.values()) call.reject(error);
    this.#pending.clear();
  }
}
