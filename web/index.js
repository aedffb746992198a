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

/** The error a cancelled call rejects with. */
function aborted(what) {
  return Object.assign(new Error(`${what} was cancelled`), { name: "AbortError" });
}

/**
 * Run `run` after the calls queued in `line` before it: one at a time, never interleaved. An
 * aborted `signal` rejects at once; a call still waiting then never runs, and `onAbort` is told
 * about one already running (it may stop it; the next call waits until it has stopped).
 */
function enqueue(line, run, signal, onAbort) {
  if (signal?.aborted) return Promise.reject(aborted("the generation"));
  let settle;
  const result = new Promise((resolve, reject) => (settle = { resolve, reject }));
  let started = false;
  const abort = () => {
    settle.reject(aborted("the generation"));
    if (started) onAbort?.();
  };
  signal?.addEventListener("abort", abort, { once: true });
  const done = line.last
    .then(async () => {
      if (signal?.aborted) return;
      started = true;
      try {
        settle.resolve(await run());
      } catch (e) {
        settle.reject(e);
      }
    })
    .finally(() => signal?.removeEventListener("abort", abort));
  line.last = done.catch(() => {});
  return result;
}

/**
 * Turn a wasm trap into the Rust panic message that caused it, and any failure after the browser
 * lost the GPU device into one error saying so (`deviceLost`; the model must be loaded again,
 * which sets up a new device).
 */
function explain(error, onGpu) {
  const panic = globalThis.__instaflowPanic;
  const lost = globalThis.__instaflowDeviceLost;
  if (lost && onGpu && (error instanceof WebAssembly.RuntimeError || /GPU device was lost/.test(error?.message))) {
    globalThis.__instaflowPanic = undefined;
    const e = new Error(`the GPU device was lost (${lost}); the model must be loaded again`);
    return Object.assign(e, { fatal: true, deviceLost: true });
  }
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

/** Calls waiting on the GPU, each ended when the browser reports the device lost (told by the
 * wasm side): a loss during a generation can leave it waiting for a read-back that never comes. */
const lostWaiters = new Set();
globalThis.__instaflowOnDeviceLost = () => {
  for (const end of lostWaiters) end();
  lostWaiters.clear();
};

/** `call`, or a trap-like failure as soon as the GPU device is lost. */
async function untilDeviceLost(call) {
  let end;
  const lost = new Promise((_, reject) => (end = () => reject(new WebAssembly.RuntimeError("the GPU device was lost"))));
  lostWaiters.add(end);
  try {
    return await Promise.race([call, lost]);
  } finally {
    lostWaiters.delete(end);
  }
}

/** A text-to-image model running in this thread. */
export class InstaFlow {
  #model;
  #line = { last: Promise.resolve() };
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
      throw explain(e, backend !== "cpu");
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

  /**
   * Generate one image. Calls run one after another, never interleaved. `signal` cancels: a call
   * still queued never runs; one already running rejects at once and its result is dropped (the
   * device finishes its work first — `InstaFlowWorker` stops it at once).
   */
  generate({ prompt, seed = 0, noise, guidance = 1, steps = 1, latents = false, width = 0, height = 0, signal } = {}) {
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
      const onGpu = this.#model.backend === "webgpu";
      let image;
      try {
        const call = this.#model.generate(prompt, seed, noise, steps, guidance, latents, width, height);
        image = await (onGpu ? untilDeviceLost(call) : call);
      } catch (e) {
        // A trap on the GPU may come from the device going away; the browser's notice of the
        // loss can arrive a moment after the failed read-back that trapped.
        if (onGpu && e instanceof WebAssembly.RuntimeError) await new Promise((resolve) => setTimeout(resolve, 0));
        const error = explain(e, onGpu);
        if (error.fatal) this.#broken = error.deviceLost ? error : new Error(`${error.message} (load the model again)`);
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
    return enqueue(this.#line, run, signal);
  }

  /** Release the model's memory (GPU buffers and wasm heap). Generations already queued fail. */
  free() {
    try {
      this.#model?.free();
    } catch {
      // After a trap the wasm side may refuse; its memory goes with the instance.
    }
    this.#model = null;
    this.#broken = new Error("the model was freed");
  }
}

/**
 * The same API as `InstaFlow`, with the model in a module Web Worker (`./worker.js`). A worker
 * that crashes (a wasm trap, a lost device, an uncaught error) is replaced on the next request:
 * the model is loaded again (from the download cache) and the request runs. `onCrash(error)` is
 * called when it happens, and `crashes` counts it.
 */
export class InstaFlowWorker {
  #worker;
  #pending = new Map();
  #next = 0;
  #line = { last: Promise.resolve() };
  /** Starts a worker. */
  #spawn;
  /** The load request, sent again to a new worker. */
  #loadRequest;
  /** Why the current worker is gone (a crash or a cancelled generation), or null. */
  #down = null;
  #freed = false;
  backend;
  precision;
  noiseShape;
  /** Worker crashes so far (each was followed by a new worker on the next request). */
  crashes = 0;
  /** Called with the error when the worker crashes. */
  onCrash = null;

  constructor(spawn) {
    this.#spawn = spawn;
    this.#attach(spawn());
  }

  #attach(worker) {
    this.#worker = worker;
    worker.onmessage = ({ data }) => {
      if (worker !== this.#worker) return;
      const call = this.#pending.get(data.id);
      if (!call) return;
      if (data.progress) return call.onProgress?.(data.progress);
      this.#pending.delete(data.id);
      const error = data.error && Object.assign(new Error(data.error), { fatal: data.fatal, deviceLost: data.deviceLost });
      if (!error) return call.resolve(data.result);
      call.reject(error);
      // A trap leaves the worker's wasm instance unusable: replace the worker, not just the model.
      if (data.fatal && this.#loadRequest) this.#crashed(error);
    };
    worker.onerror = (e) => {
      e.preventDefault?.();
      if (worker === this.#worker) this.#crashed(new Error(`the model worker crashed: ${e.message ?? "unknown error"}`));
    };
  }

  /** End the current worker; calls in flight reject with `error`. */
  #stop(error) {
    this.#worker.terminate();
    for (const call of this.#pending.values()) call.reject(error);
    this.#pending.clear();
  }

  #crashed(error) {
    error.crashed = true;
    this.#stop(error);
    this.#down = error;
    this.crashes++;
    this.onCrash?.(error);
  }

  /** A new worker with the model loaded again, if the last one is gone. */
  async #revive() {
    if (!this.#down) return null;
    const why = this.#down;
    this.#attach(this.#spawn());
    this.#down = null;
    try {
      await this.#call(this.#loadRequest);
    } catch (e) {
      this.#stop(e);
      this.#down = e;
      throw new Error(`the model worker stopped (${why.message}) and the model could not be loaded again: ${e.message}`);
    }
    return why;
  }

  #call(message, onProgress, transfer = []) {
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, onProgress });
      this.#worker.postMessage({ id, ...message }, transfer);
    });
  }

  /**
   * Start a worker and load `source` in it (see `InstaFlow.load`); `signal` stops the worker.
   * `worker`: a function that starts one (bundlers that need it created by hand; called again to
   * replace a crashed worker), or a started worker (replaced by the package's own after a crash).
   */
  static async load(source, { onProgress, backend = "auto", precision = "auto", wasm, worker, signal, cache = true, hfEndpoint, pieceBytes, requestBytes } = {}) {
    if (signal?.aborted) throw aborted("loading");
    let given = worker instanceof Function ? null : worker;
    const spawn =
      worker instanceof Function
        ? worker
        : () => {
            if (!given) return new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
            const w = given;
            given = null;
            return w;
          };
    const proxy = new InstaFlowWorker(spawn);
    // Relative URLs are resolved here: the worker's base URL is its script's.
    const absolute = (u) => (typeof u === "string" || u instanceof URL ? new URL(String(u), globalThis.location?.href).href : u);
    const src =
      typeof source === "string" || source instanceof URL
        ? absolute(source)
        : Object.fromEntries((source instanceof Map ? [...source.entries()] : Object.entries(source ?? {})).map(([k, v]) => [k, absolute(v)]));
    // Cancelling a load in a worker ends the worker: its fetches stop and its memory is returned.
    const onAbort = () => proxy.#stop(aborted("loading"));
    signal?.addEventListener("abort", onAbort);
    const request = { op: "load", source: src, backend, precision, wasm: wasm && absolute(wasm), cache, hfEndpoint, pieceBytes, requestBytes };
    try {
      const info = await proxy.#call(request, onProgress);
      proxy.backend = info.backend;
      proxy.precision = info.precision;
      proxy.noiseShape = info.noiseShape;
      proxy.loadStats = info.loadStats;
    } catch (e) {
      proxy.#worker.terminate();
      throw e;
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
    proxy.#loadRequest = request;
    return proxy;
  }

  /**
   * See `InstaFlow.generate`. Cancelling a running generation ends the worker at once; the next
   * request starts a new one (the model is loaded again from the cache). When this call replaced
   * a crashed worker, the result's `recoveredFrom` says what happened to it.
   */
  generate({ signal, ...options } = {}) {
    const run = async () => {
      if (this.#freed) throw new Error("the model was freed");
      let recovered = await this.#revive();
      let result;
      try {
        result = await this.#call({ op: "generate", options });
      } catch (e) {
        // A lost GPU device (a driver reset, the GPU process restarted) is usually gone for good
        // while a new one works: retry once in a new worker, which sets up a new device.
        if (!e.deviceLost || recovered) throw e;
        recovered = await this.#revive();
        result = await this.#call({ op: "generate", options });
      }
      if (recovered?.crashed) result.recoveredFrom = recovered.message;
      return result;
    };
    const cancel = () => {
      this.#stop(aborted("the generation"));
      this.#down = aborted("the generation");
    };
    return enqueue(this.#line, run, signal, cancel);
  }

  /** Stop the worker and free the model. */
  free() {
    this.#freed = true;
    this.#stop(new Error("the model was freed"));
  }
}
