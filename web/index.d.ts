/** Bytes loaded so far while fetching or reading a model's files. */
export interface LoadProgress {
  /** The file the last bytes belonged to, e.g. `unet/diffusion_pytorch_model.safetensors`. */
  file: string;
  /** Bytes read so far, all files together. */
  loaded: number;
  /** Weight bytes to read in all (known once the headers are read). */
  total: number;
  /** Average speed so far, bytes per second (cache hits included). */
  bytesPerSecond: number;
  /** Estimated seconds until every weight byte is read, or `null` before an estimate exists. */
  secondsLeft: number | null;
}

/** What a load did. */
export interface LoadStats {
  /** Body bytes read from the network (0 when everything came from the cache). */
  networkBytes: number;
  /** Weight bytes read (network or cache). */
  weightBytes: number;
  /** Bytes the weights occupy on the device (f32). */
  deviceBytes: number;
  /** Pieces handed to the device one at a time (large tensors are split). */
  pieces: number;
  /** Range requests (or cache reads) made for them. */
  requests: number;
  /** Size of the wasm memory after loading (wasm memory only grows: its peak so far). */
  wasmMemoryBytes: number;
}

/** Where a model's files come from: the URL of a diffusers folder (with `model_index.json`), a
 * Hugging Face Hub id `hf:ORG/NAME` (optionally `@REVISION`), or a map of file names relative to
 * the folder (`unet/config.json`, …) to their contents. */
export type ModelSource =
  | string
  | URL
  | Map<string, string | URL | ArrayBuffer | ArrayBufferView | Blob>
  | Record<string, string | URL | ArrayBuffer | ArrayBufferView | Blob>;

/** Options of `InstaFlow.load`. */
export interface LoadOptions {
  /** Called as bytes arrive. */
  onProgress?: (progress: LoadProgress) => void;
  /** `"auto"` (default): WebGPU when the browser gives an adapter, else the wasm CPU backend. */
  backend?: "auto" | "webgpu" | "cpu";
  /** WebGPU float type. `"auto"` (default): f16 where the adapter has `shader-f16` (half the GPU
   * memory), else f32. The first model loaded fixes it for the page (or worker). The CPU backend
   * computes in f32. */
  precision?: "auto" | "f16" | "f32";
  /** Where to fetch `instaflow_wasm_bg.wasm` from (default: next to the package's JS). */
  wasm?: string | URL;
  /** Cancels the load: fetching stops, what was uploaded is freed, the promise rejects with an
   * `AbortError`. */
  signal?: AbortSignal;
  /** Keep downloads in the Cache API and reuse them (default true). */
  cache?: boolean;
  /** The Hub for `hf:` ids (default `https://huggingface.co`; a mirror works too). */
  hfEndpoint?: string;
  /** Largest piece of a tensor moved through wasm memory at once (default 16 MiB). */
  pieceBytes?: number;
  /** Bytes fetched per HTTP request (default 32 MiB; one cache entry each). */
  requestBytes?: number;
}

/** Options of `InstaFlowWorker.load`. */
export interface WorkerLoadOptions extends LoadOptions {
  /** A function that starts a worker on `instaflow/worker.js` (bundlers that need it created by
   * hand; called again to replace a crashed worker), or a worker already started. */
  worker?: Worker | (() => Worker);
}

/** What to generate. */
export interface GenerateOptions {
  /** The text prompt (cut to CLIP's 77 tokens). */
  prompt: string;
  /** Seed of the initial noise (same generator as the native CLI). Default 0. */
  seed?: number;
  /** Initial noise, `noiseShape` flattened; overrides `seed`. */
  noise?: Float32Array;
  /** Guidance α: v = α·v(prompt) + (1 − α)·v(""). Default 1 (one UNet call per step). */
  guidance?: number;
  /** Euler steps. Default 1 (one-step models). */
  steps?: number;
  /** Also return the final latents (before decoding). */
  latents?: boolean;
  /** Image width in pixels (0 or absent: the model's own size). */
  width?: number;
  /** Image height in pixels (0 or absent: the model's own size). */
  height?: number;
  /** Cancels the generation: the promise rejects with an `AbortError` at once; a queued call never
   * runs. */
  signal?: AbortSignal;
}

/** Milliseconds per stage (each measured after the device finished it). */
export interface Timings {
  encodeMs: number;
  unetMs: number;
  decodeMs: number;
  totalMs: number;
}

/** A generated image. */
export interface GeneratedImage {
  width: number;
  height: number;
  /** RGBA bytes, ready for `new ImageData(rgba, width, height)`. */
  rgba: Uint8ClampedArray<ArrayBuffer>;
  /** The backend that computed it. */
  backend: "webgpu" | "cpu";
  /** The float type it was computed in. */
  precision: "f16" | "f32";
  timings: Timings;
  /** The final latents `[1, C, h, w]`, when `latents: true` was asked. */
  latents?: Float32Array<ArrayBuffer>;
  /** Size of the wasm memory of the thread that ran it. */
  wasmMemoryBytes: number;
  /** `InstaFlowWorker` only: set when this call replaced a crashed worker (or one whose GPU device
   * was lost), saying what happened. */
  recoveredFrom?: string;
}

/** A text-to-image model running in the calling thread. */
export declare class InstaFlow {
  private constructor();
  /** Fetch or read the model's files (with progress) and load them. */
  static load(source: ModelSource, options?: LoadOptions): Promise<InstaFlow>;
  /** The backend in use. */
  readonly backend: "webgpu" | "cpu";
  /** The float type of the computation. */
  readonly precision: "f16" | "f32";
  /** `[1, C, h, w]`: the shape of `noise`. */
  readonly noiseShape: number[];
  /** What the load did. */
  readonly loadStats: LoadStats;
  /** Generate one image. Calls on one model run one after another, never interleaved; a cancelled
   * running call rejects at once and its result is dropped. */
  generate(options: GenerateOptions): Promise<GeneratedImage>;
  /** Release GPU buffers and wasm memory. */
  free(): void;
}

/** The same API, with the model in a module Web Worker so the page stays responsive. */
export declare class InstaFlowWorker {
  private constructor();
  static load(source: ModelSource, options?: WorkerLoadOptions): Promise<InstaFlowWorker>;
  readonly backend: "webgpu" | "cpu";
  readonly precision: "f16" | "f32";
  readonly noiseShape: number[];
  readonly loadStats: LoadStats;
  /** Worker crashes so far; each is followed by a new worker (model loaded again from the cache)
   * on the next request. */
  readonly crashes: number;
  /** Called with the error when the worker crashes. */
  onCrash: ((error: Error) => void) | null;
  /** One image; cancelling a running call ends the worker at once (a new one serves the next). */
  generate(options: GenerateOptions): Promise<GeneratedImage>;
  /** Stop the worker (and with it the model). */
  free(): void;
}

/** Instantiate the wasm module ahead of `load` (optional). */
export declare function init(wasm?: string | URL): Promise<unknown>;
/** The package version. */
export declare function version(): Promise<string>;
/** Delete every model download kept in the Cache API; resolves to whether there was any. */
export declare function clearCache(): Promise<boolean>;
/** `navigator.storage.estimate()` where the browser has it. */
export declare function storageEstimate(): Promise<{ usage?: number; quota?: number } | null>;
/** The folder URL a source string stands for (`hf:ORG/NAME[@REV]`, a Hub page URL, or a URL). */
export declare function resolveModelUrl(source: string | URL, options?: { hfEndpoint?: string; base?: string }): string;
/** Size of this thread's wasm memory in bytes. */
export declare function wasmMemoryBytes(): number;
