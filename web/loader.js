// Streaming model loader: reads a diffusers folder's small files and safetensors headers, lets the
// wasm `Loader` check them against the configs, then moves the weights piece by piece (HTTP Range
// requests, `Blob.slice`, or slices of in-memory buffers) into the device, one piece at a time in
// wasm memory. Downloads are kept in the Cache API, keyed by URL and the file's version (ETag, else
// size and Last-Modified), so loading the same model again reads nothing from the network.

/** Components of a diffusers folder and the weight-file stems each may use (the order the Rust
 * loader tries them in). */
export const COMPONENTS = {
  text_encoder: ["model", "pytorch_model"],
  unet: ["diffusion_pytorch_model", "model"],
  vae: ["diffusion_pytorch_model", "model"],
};
const TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];
/** The Cache API bucket of downloaded weights. */
export const CACHE_NAME = "instaflow-models-v1";
/** Pieces are fetched in requests of about this size (one cache entry each). */
const REQUEST_BYTES = 32 << 20;
const HF_ENDPOINT = "https://huggingface.co";

const abortError = () => Object.assign(new Error("loading was cancelled"), { name: "AbortError" });
const checkAbort = (signal) => {
  if (signal?.aborted) throw abortError();
};

/** `hf:ORG/NAME[@REVISION]` (on `hfEndpoint`) or a model page `https://huggingface.co/ORG/NAME`
 * → the folder URL its files are read from; other URLs are folders already. */
export function resolveModelUrl(source, { hfEndpoint = HF_ENDPOINT, base = globalThis.location?.href } = {}) {
  const text = String(source);
  const hf = text.match(/^hf:([\w.-]+\/[\w.-]+)(?:@([\w./-]+))?\/?$/);
  if (hf) return `${hfEndpoint.replace(/\/$/, "")}/${hf[1]}/resolve/${hf[2] ?? "main"}/`;
  const url = new URL(text, base);
  // A model's page on huggingface.co (`/ORG/NAME`, `/ORG/NAME/tree/REV`) stands for its files.
  const repo = url.pathname.match(/^\/([\w.-]+\/[\w.-]+)(?:\/tree\/([\w.-]+))?\/?$/);
  if (url.origin === HF_ENDPOINT && repo) return `${url.origin}/${repo[1]}/resolve/${repo[2] ?? "main"}/`;
  return url.href.endsWith("/") ? url.href : `${url.href}/`;
}

/** Reads files of a folder served over HTTP: Range requests when the server honours them, else the
 * whole body streamed; every response body cached under the file's version. */
class UrlFiles {
  constructor(root, { signal, cache }) {
    this.root = root;
    this.signal = signal;
    this.useCache = cache && typeof caches !== "undefined";
    this.meta = new Map(); // name → { size, version, ranges }
    this.network = 0; // body bytes read from the network
  }

  url(name) {
    return new URL(name, this.root).href;
  }

  async fetch(url, init = {}) {
    try {
      return await fetch(url, { ...init, signal: this.signal });
    } catch (e) {
      if (this.signal?.aborted) throw abortError();
      throw new Error(`could not reach ${url} (${e.message ?? e})`);
    }
  }

  /** Size and version of `name`; `null` when it does not exist and `optional`. */
  async stat(name, optional = false) {
    if (this.meta.has(name)) return this.meta.get(name);
    const url = this.url(name);
    // HEAD reads no body bytes; Content-Length is visible to pages cross-origin too. Servers
    // that refuse HEAD are asked for one byte instead (Content-Range carries the size).
    let response = await this.fetch(url, { method: "HEAD", cache: "no-store" });
    if (response.status === 405 || response.status === 501) {
      response = await this.fetch(url, { headers: { Range: "bytes=0-0" }, cache: "no-store" });
      await response.body?.cancel().catch(() => {});
    }
    if (!response.ok) {
      if (response.status === 404 && optional) return null;
      throw new Error(`${url}: HTTP ${response.status} ${response.statusText}`.trim());
    }
    const range = response.headers.get("Content-Range")?.match(/\/(\d+)$/);
    // A compressed response's Content-Length is the compressed size, not the file's: then the
    // size is unknown until read (ranges are served plain, and whole bodies arrive decoded).
    const encoding = response.headers.get("Content-Encoding");
    const compressed = encoding !== null && encoding !== "identity";
    const size = range ? Number(range[1]) : compressed ? null : Number(response.headers.get("Content-Length")) || null;
    const etag = response.headers.get("X-Linked-Etag") ?? response.headers.get("ETag");
    const version = etag ?? `${size}-${response.headers.get("Last-Modified") ?? ""}`;
    // Range support is assumed until a Range request is answered with the whole file.
    const meta = { size, version, ranges: response.headers.get("Accept-Ranges") !== "none" };
    this.meta.set(name, meta);
    await this.evictStale(name, version);
    return meta;
  }

  cacheKey(name, version, start, end) {
    const key = new URL(this.url(name));
    key.searchParams.set("instaflow-version", version);
    if (start !== undefined) key.searchParams.set("instaflow-bytes", `${start}-${end}`);
    return key.href;
  }

  async cached(key) {
    if (!this.useCache) return null;
    const cache = await caches.open(CACHE_NAME);
    const hit = await cache.match(key);
    return hit ? new Uint8Array(await hit.arrayBuffer()) : null;
  }

  async store(key, bytes) {
    if (!this.useCache) return;
    try {
      const cache = await caches.open(CACHE_NAME);
      // Written only once every byte has arrived: an interrupted download leaves no entry.
      await cache.put(key, new Response(bytes, { headers: { "Content-Length": String(bytes.length) } }));
    } catch {
      // A full quota only costs the cache, not the load.
    }
  }

  /** Drop cache entries of `name` made for another version of the file (they can never be used
   * again). */
  async evictStale(name, version) {
    if (!this.useCache) return;
    const cache = await caches.open(CACHE_NAME);
    const base = this.url(name);
    for (const request of await cache.keys()) {
      const url = new URL(request.url);
      const v = url.searchParams.get("instaflow-version");
      url.search = "";
      if (url.href === base && v !== version) await cache.delete(request);
    }
  }

  /** The whole (small) file `name`, or `null` if `optional` and missing. */
  async read(name, optional = false) {
    const meta = await this.stat(name, optional);
    if (!meta) return null;
    const key = this.cacheKey(name, meta.version);
    const hit = await this.cached(key);
    if (hit) return hit;
    const response = await this.fetch(this.url(name));
    if (!response.ok) throw new Error(`${this.url(name)}: HTTP ${response.status}`);
    const bytes = new Uint8Array(await response.arrayBuffer());
    this.network += bytes.length;
    await this.store(key, bytes);
    return bytes;
  }

  /** Bytes `[start, end)` of `name`, calling `onBytes(n)` as they arrive. */
  async range(name, start, end, onBytes) {
    const meta = await this.stat(name);
    const key = this.cacheKey(name, meta.version, start, end);
    const hit = await this.cached(key);
    if (hit) {
      onBytes(hit.length, true);
      return hit;
    }
    const bytes = meta.ranges ? await this.#fetchRange(name, start, end, onBytes) : await this.#readSequential(name, start, end, onBytes);
    await this.store(key, bytes);
    return bytes;
  }

  async #fetchRange(name, start, end, onBytes) {
    const url = this.url(name);
    const response = await this.fetch(url, { headers: { Range: `bytes=${start}-${end - 1}` }, cache: "no-store" });
    if (response.status === 206) return this.#readBody(response, url, end - start, onBytes);
    if (response.status === 200) {
      // The server ignores Range: read this body from the start, and do so from now on.
      this.meta.get(name).ranges = false;
      return this.#readSequential(name, start, end, onBytes, start === 0 ? response : (await response.body?.cancel().catch(() => {}), null));
    }
    await response.body?.cancel().catch(() => {});
    throw new Error(`${url}: HTTP ${response.status} ${response.statusText}`.trim());
  }

  #streams = new Map(); // name → { reader, offset, pending } of a file read from its start
  #chains = new Map(); // name → the last sequential read queued on that file

  /** Without Range support: read the file's body in order, once, handing out `[start, end)`
   * slices as they pass; reads of one file are queued so they consume the stream in order, and a
   * read behind the stream's position starts it again. `response` is a body already begun. */
  #readSequential(name, start, end, onBytes, response = null) {
    const url = this.url(name);
    const run = async () => {
      let s = this.#streams.get(name);
      if (!s || start < s.offset) {
        s?.reader.cancel().catch(() => {});
        const r = response ?? (await this.fetch(url, { cache: "no-store" }));
        response = null;
        if (!r.ok) {
          await r.body?.cancel().catch(() => {});
          throw new Error(`${url}: HTTP ${r.status} ${r.statusText}`.trim());
        }
        s = { reader: r.body.getReader(), offset: 0, pending: new Uint8Array(0) };
        this.#streams.set(name, s);
      }
      const out = new Uint8Array(end - start);
      let filled = 0;
      while (filled < out.length) {
        let chunk = s.pending;
        s.pending = new Uint8Array(0);
        if (!chunk.length) {
          const { done, value } = await s.reader.read();
          if (done) throw new Error(`${url}: the file ended at byte ${s.offset}, expected at least ${end}`);
          chunk = value;
          this.network += value.length;
        }
        const chunkStart = s.offset;
        const chunkEnd = chunkStart + chunk.length;
        if (chunkEnd <= start) {
          s.offset = chunkEnd;
          continue;
        }
        const from = Math.max(start, chunkStart) - chunkStart;
        const to = Math.min(end, chunkEnd) - chunkStart;
        out.set(chunk.subarray(from, to), chunkStart + from - start);
        filled += to - from;
        onBytes(to - from, false);
        s.pending = chunk.subarray(to);
        s.offset = chunkStart + to;
      }
      return out;
    };
    const next = (this.#chains.get(name) ?? Promise.resolve()).then(run, run);
    this.#chains.set(name, next.catch(() => {}));
    return next;
  }

  async #readBody(response, url, length, onBytes) {
    const out = new Uint8Array(length);
    const reader = response.body.getReader();
    let offset = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (offset + value.length > length) {
        reader.cancel().catch(() => {});
        throw new Error(`${url}: the server sent more bytes than asked for`);
      }
      out.set(value, offset);
      offset += value.length;
      this.network += value.length;
      onBytes(value.length, false);
    }
    if (offset !== length) throw new Error(`${url}: got ${offset} of ${length} bytes (connection cut?)`);
    return out;
  }
}

/** Reads files from a map name → URL | ArrayBuffer | typed array | Blob (a folder picker). */
class MapFiles {
  constructor(map, options) {
    this.entries = new Map(map instanceof Map ? [...map.entries()] : Object.entries(map ?? {}));
    this.options = options;
    this.urls = new Map(); // name → UrlFiles for entries given as URLs
    this.network = 0;
  }

  #value(name) {
    return this.entries.get(name);
  }

  #urlFiles(name) {
    const value = String(this.#value(name));
    if (!this.urls.has(name)) {
      const url = new URL(value, globalThis.location?.href);
      this.urls.set(name, { files: new UrlFiles(url.href, this.options), file: "" });
    }
    return this.urls.get(name).files;
  }

  #isUrl(name) {
    const v = this.#value(name);
    return typeof v === "string" || v instanceof URL;
  }

  async stat(name, optional = false) {
    const v = this.#value(name);
    if (v === undefined) {
      if (optional) return null;
      throw new Error(`file ${name} is missing from the given files`);
    }
    if (this.#isUrl(name)) return this.#urlFiles(name).stat("", optional);
    if (typeof Blob !== "undefined" && v instanceof Blob) return { size: v.size };
    if (v instanceof ArrayBuffer || ArrayBuffer.isView(v)) return { size: v.byteLength };
    throw new Error(`file ${name}: expected a URL, ArrayBuffer, typed array or Blob`);
  }

  #bytes(v) {
    return v instanceof ArrayBuffer ? new Uint8Array(v) : new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  }

  async read(name, optional = false) {
    if (!(await this.stat(name, optional))) return null;
    const v = this.#value(name);
    if (this.#isUrl(name)) return this.#urlFiles(name).read("");
    if (v instanceof Blob) return new Uint8Array(await v.arrayBuffer());
    return this.#bytes(v).slice();
  }

  async range(name, start, end, onBytes) {
    await this.stat(name);
    const v = this.#value(name);
    if (this.#isUrl(name)) return this.#urlFiles(name).range("", start, end, onBytes);
    const bytes = v instanceof Blob ? new Uint8Array(await v.slice(start, end).arrayBuffer()) : this.#bytes(v).subarray(start, end);
    if (bytes.length !== end - start) throw new Error(`file ${name}: bytes ${start}..${end} are beyond its end`);
    onBytes(bytes.length, false);
    return bytes;
  }

  get networkBytes() {
    return [...this.urls.values()].reduce((n, u) => n + u.files.network, 0);
  }
}

/** The weight files of component `dir`: a single file or the shards of an index. */
async function weightFiles(files, dir, decode) {
  for (const stem of COMPONENTS[dir]) {
    const single = `${dir}/${stem}.safetensors`;
    if (await files.stat(single, true)) return { files: [single], small: {} };
    const indexName = `${dir}/${stem}.safetensors.index.json`;
    const index = await files.read(indexName, true);
    if (index) {
      let map;
      try {
        map = JSON.parse(decode(index)).weight_map;
      } catch (e) {
        throw new Error(`${indexName} is not valid JSON (${e.message})`);
      }
      const shards = [...new Set(Object.values(map ?? {}))].map((s) => `${dir}/${s}`);
      if (!shards.length) throw new Error(`${indexName}: \`weight_map\` lists no files`);
      return { files: shards, small: { [indexName]: index } };
    }
  }
  throw new Error(`${dir}/: no weights (${COMPONENTS[dir].map((s) => `${s}.safetensors`).join(" or ")})`);
}

/** Tracks bytes, speed and time left, reported through `onProgress`. */
class Progress {
  constructor(onProgress) {
    this.onProgress = onProgress;
    this.loaded = 0;
    this.total = 0;
    this.network = 0;
    this.started = performance.now();
    this.file = "";
  }
  add(file, n, fromCache) {
    this.file = file;
    this.loaded += n;
    if (!fromCache) this.network += n;
    const seconds = (performance.now() - this.started) / 1000;
    const bytesPerSecond = seconds > 0 ? this.loaded / seconds : 0;
    this.onProgress?.({
      file,
      loaded: this.loaded,
      total: Math.max(this.total, this.loaded),
      bytesPerSecond,
      secondsLeft: bytesPerSecond > 0 ? Math.max(this.total - this.loaded, 0) / bytesPerSecond : null,
    });
  }
}

/**
 * Load a model into a fresh wasm `Loader`: `WasmLoader` is the wasm class, `source` a folder URL,
 * an `hf:` id or a map of files. Returns `{ model, stats }`.
 */
export async function loadModel(WasmLoader, source, { onProgress, backend = "auto", precision = "auto", signal, cache = true, hfEndpoint, pieceBytes = 0, requestBytes = REQUEST_BYTES } = {}) {
  checkAbort(signal);
  const options = { signal, cache };
  const files =
    typeof source === "string" || source instanceof URL
      ? new UrlFiles(resolveModelUrl(source, { hfEndpoint }), options)
      : new MapFiles(source, options);
  const decoder = new TextDecoder();
  const decode = (b) => decoder.decode(b);
  const progress = new Progress(onProgress);
  const where = files.root ?? "";

  const indexBytes = await files.read("model_index.json", true);
  let index = null;
  if (indexBytes) {
    try {
      index = JSON.parse(decode(indexBytes));
    } catch (e) {
      throw new Error(`${where}model_index.json is not valid JSON (${e.message})`);
    }
  } else if (files.root) {
    throw new Error(`${files.root}model_index.json not found: is ${files.root} a diffusers model folder?`);
  }
  const small = {};
  if (indexBytes) small["model_index.json"] = indexBytes;
  await Promise.all(
    TOKENIZER_FILES.map(async (f) => {
      const bytes = await files.read(`tokenizer/${f}`, true);
      if (bytes) small[`tokenizer/${f}`] = bytes;
    }),
  );
  const headers = {};
  const sizes = {};
  const dirs = Object.keys(COMPONENTS).filter((dir) => (index ? dir in index : dir !== "vae" || files.entries?.has("vae/config.json")));
  await Promise.all(
    dirs.map(async (dir) => {
      small[`${dir}/config.json`] = await files.read(`${dir}/config.json`);
      const found = await weightFiles(files, dir, decode);
      Object.assign(small, found.small);
      for (const file of found.files) {
        checkAbort(signal);
        const { size } = await files.stat(file);
        const noop = () => {};
        const prefix = await files.range(file, 0, 8, noop);
        const n = Number(new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true));
        if (!(n > 0 && n < 1e8 && (size === null || 8 + n <= size))) {
          throw new Error(`${where}${file}: not a valid safetensors file (header length ${n})`);
        }
        headers[file] = await files.range(file, 8, 8 + n, noop);
        small[file] = new Uint8Array(0);
        if (size !== null) sizes[file] = size;
      }
    }),
  );
  checkAbort(signal);

  // Checks every name and shape against the configs before any weight byte is fetched.
  const loader = await WasmLoader.create(small, headers, sizes, backend, pieceBytes, precision);
  try {
    const pieces = loader.pieces;
    progress.total = pieces.reduce((n, [, start, end]) => n + (end - start), 0);
    // Consecutive pieces of a file are fetched together, up to `requestBytes` per request.
    const groups = [];
    for (let i = 0; i < pieces.length; i++) {
      const [file, start, end] = pieces[i];
      const g = groups.at(-1);
      if (g && g.file === file && g.end === start && end - g.start <= requestBytes) {
        g.end = end;
        g.last = i;
      } else {
        groups.push({ file, start, end, first: i, last: i });
      }
    }
    let ahead = null; // the next group's bytes, fetched while this one is uploaded
    const get = (g) => files.range(g.file, g.start, g.end, (n, fromCache) => progress.add(g.file, n, fromCache));
    for (let k = 0; k < groups.length; k++) {
      checkAbort(signal);
      const g = groups[k];
      const bytes = await (ahead ?? get(g));
      ahead = k + 1 < groups.length ? get(groups[k + 1]) : null;
      ahead?.catch(() => {}); // awaited on the next turn; a failure there is reported then
      for (let i = g.first; i <= g.last; i++) {
        const [, start, end] = pieces[i];
        loader.put(i, bytes.subarray(start - g.start, end - g.start));
      }
    }
    checkAbort(signal);
    const stats = { networkBytes: files.network ?? files.networkBytes, weightBytes: progress.total, deviceBytes: loader.deviceBytes, pieces: pieces.length, requests: groups.length };
    return { model: loader.finish(), stats };
  } catch (e) {
    try {
      loader.free(); // frees what was uploaded so far
    } catch {
      // already consumed by finish()
    }
    throw e;
  }
}

/** Delete every cached model download. */
export async function clearCache() {
  if (typeof caches === "undefined") return false;
  return caches.delete(CACHE_NAME);
}

/** `navigator.storage.estimate()` where the browser has it: `{ usage, quota }` in bytes. */
export async function storageEstimate() {
  return (await globalThis.navigator?.storage?.estimate?.()) ?? null;
}
