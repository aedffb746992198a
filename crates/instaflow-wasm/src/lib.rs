//! InstaFlow in the browser: wasm-bindgen bindings over the `instaflow` core crate. One-step (or
//! N-step) generation runs on burn's WebGPU backend, or on its CPU backend compiled to wasm when
//! the browser offers no WebGPU adapter.

use std::collections::BTreeMap;

use burn::backend::wgpu::{WgpuDevice, WgpuRuntime, graphics, init_setup_async};
use burn::backend::{Flex, WebGpu};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, IntDType, Tensor, set_default_dtypes};
use instaflow::sd::pipeline::{
    GenerateOptions, Generated, InitialNoise, InstaFlowPipeline, StageHook, to_rgba8_async,
};
use instaflow::sd::source::ModelSource;
use instaflow::sd::weights::stream::{self, StreamingLoader};
use js_sys::{Function, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

/// The package version (the core crate's version).
#[wasm_bindgen]
pub fn version() -> String {
    instaflow::version().to_string()
}

/// Whether `navigator.gpu` exists and hands out an adapter.
async fn webgpu_adapter_available() -> bool {
    let probe = async {
        let navigator = Reflect::get(&js_sys::global(), &"navigator".into()).ok()?;
        let gpu = Reflect::get(&navigator, &"gpu".into()).ok()?;
        if gpu.is_undefined() || gpu.is_null() {
            return None;
        }
        let request: Function = Reflect::get(&gpu, &"requestAdapter".into())
            .ok()?
            .dyn_into()
            .ok()?;
        let promise: Promise = request.call0(&gpu).ok()?.dyn_into().ok()?;
        let adapter = JsFuture::from(promise).await.ok()?;
        (!adapter.is_null() && !adapter.is_undefined()).then_some(())
    };
    probe.await.is_some()
}

enum Engine {
    Gpu(Box<InstaFlowPipeline<WebGpu>>, WgpuDevice),
    Cpu(Box<InstaFlowPipeline<Flex>>),
}

/// Keep the message of a Rust panic where JavaScript can read it (`globalThis.__instaflowPanic`)
/// after the wasm trap that follows it: the JS wrapper turns "unreachable" into this message.
#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        let message = info.to_string();
        let _ = Reflect::set(
            &js_sys::global(),
            &"__instaflowPanic".into(),
            &message.clone().into(),
        );
        web_sys_console_error(&message);
    }));
}

fn web_sys_console_error(message: &str) {
    let console = Reflect::get(&js_sys::global(), &"console".into()).ok();
    let error = console
        .as_ref()
        .and_then(|c| Reflect::get(c, &"error".into()).ok())
        .and_then(|f| f.dyn_into::<Function>().ok());
    if let (Some(console), Some(error)) = (console, error) {
        let _ = error.call1(&console, &message.into());
    }
}

/// A generated image: RGBA bytes for a canvas `ImageData`, how it was made and how long it took.
#[wasm_bindgen]
pub struct GeneratedImage {
    width: u32,
    height: u32,
    rgba: Vec<u8>,
    latents: Option<Vec<f32>>,
    backend: String,
    encode_ms: f64,
    unet_ms: f64,
    decode_ms: f64,
    total_ms: f64,
}

#[wasm_bindgen]
impl GeneratedImage {
    /// Width in pixels.
    #[wasm_bindgen(getter)]
    pub fn width(&self) -> u32 {
        self.width
    }
    /// Height in pixels.
    #[wasm_bindgen(getter)]
    pub fn height(&self) -> u32 {
        self.height
    }
    /// Pixels, 4 bytes each (RGBA, opaque).
    #[wasm_bindgen(getter)]
    pub fn rgba(&self) -> js_sys::Uint8ClampedArray {
        js_sys::Uint8ClampedArray::from(self.rgba.as_slice())
    }
    /// The final latents `[1, C, h, w]` before decoding, when asked for.
    #[wasm_bindgen(getter)]
    pub fn latents(&self) -> Option<js_sys::Float32Array> {
        self.latents.as_deref().map(js_sys::Float32Array::from)
    }
    /// `webgpu` or `cpu`.
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        self.backend.clone()
    }
    /// Milliseconds in the text encoder (finished, not just queued).
    #[wasm_bindgen(getter, js_name = encodeMs)]
    pub fn encode_ms(&self) -> f64 {
        self.encode_ms
    }
    /// Milliseconds in the UNet steps.
    #[wasm_bindgen(getter, js_name = unetMs)]
    pub fn unet_ms(&self) -> f64 {
        self.unet_ms
    }
    /// Milliseconds decoding to pixels and reading them back.
    #[wasm_bindgen(getter, js_name = decodeMs)]
    pub fn decode_ms(&self) -> f64 {
        self.decode_ms
    }
    /// Milliseconds from the call to the pixels.
    #[wasm_bindgen(getter, js_name = totalMs)]
    pub fn total_ms(&self) -> f64 {
        self.total_ms
    }
}

/// A loaded InstaFlow model.
#[wasm_bindgen]
pub struct InstaFlow {
    engine: Engine,
    // Declared after `engine`, so dropped after it: the model's buffers are free by then.
    _cleanup: GpuCleanup,
}

/// Hands the device memory pool's free buffers back once a model (or a cancelled load) is dropped,
/// so switching models does not keep the old one's GPU memory.
struct GpuCleanup(Option<WgpuDevice>);

impl Drop for GpuCleanup {
    fn drop(&mut self) {
        if let Some(device) = &self.0 {
            <WebGpu as Backend>::memory_cleanup(device);
        }
    }
}

/// `performance.now()` (sub-millisecond, in pages and workers), else `Date.now()`.
fn now_ms() -> f64 {
    let global = js_sys::global();
    Reflect::get(&global, &"performance".into())
        .ok()
        .and_then(|p| {
            let now: Function = Reflect::get(&p, &"now".into()).ok()?.dyn_into().ok()?;
            now.call0(&p).ok()?.as_f64()
        })
        .unwrap_or_else(js_sys::Date::now)
}

fn js_error(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// The files of a diffusers folder from a JS object mapping relative paths (`unet/config.json`, …)
/// to `Uint8Array`s.
fn files_from_js(files: &JsValue) -> Result<BTreeMap<String, Vec<u8>>, JsError> {
    let object: &Object = files
        .dyn_ref()
        .ok_or_else(|| JsError::new("files must be an object mapping file names to Uint8Array"))?;
    let mut map = BTreeMap::new();
    for entry in Object::entries(object).iter() {
        let pair: js_sys::Array = entry.unchecked_into();
        let name = pair.get(0).as_string().unwrap_or_default();
        let value = pair.get(1);
        if !value.is_instance_of::<Uint8Array>() {
            return Err(JsError::new(&format!("file {name}: expected a Uint8Array")));
        }
        map.insert(name, value.unchecked_into::<Uint8Array>().to_vec());
    }
    Ok(map)
}

/// The backend a load asks for: `true` for WebGPU.
async fn choose_gpu(backend: &str) -> Result<bool, JsError> {
    Ok(match backend {
        "cpu" => false,
        "auto" => webgpu_adapter_available().await,
        "webgpu" if webgpu_adapter_available().await => true,
        "webgpu" => {
            return Err(JsError::new(
                "WebGPU is not available in this browser (no navigator.gpu adapter)",
            ));
        }
        other => {
            return Err(JsError::new(&format!(
                "backend `{other}`: expected \"auto\", \"webgpu\" or \"cpu\""
            )));
        }
    })
}

thread_local! {
    /// The WebGPU device models are loaded onto. burn's WebGPU runtime is set up once per device
    /// id (a second setup of the same id panics), so loading a second model reuses it; after the
    /// browser loses it, the next load sets up a new device under a new id.
    static GPU_DEVICE: std::cell::RefCell<Option<WgpuDevice>> = const { std::cell::RefCell::new(None) };
    /// Devices set up so far (the next one's id).
    static GPU_SETUPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Devices the browser has lost, with its reason.
    static GPU_LOST: std::cell::RefCell<Vec<(WgpuDevice, String)>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Whether the WebGPU device computes in f16: burn fixes a device's float type at its first
    /// tensor, so the first model's precision holds for the device.
    static GPU_F16: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// The WebGPU device's largest buffer in bytes (the smaller of `maxBufferSize` and
    /// `maxStorageBufferBindingSize`: burn binds every tensor as one storage buffer).
    static GPU_MAX_BUFFER: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
}

fn precision_name(f16: bool) -> &'static str {
    if f16 { "f16" } else { "f32" }
}

/// Why the browser lost `device` (a driver reset, the GPU process gone, `GPUDevice.destroy()`),
/// or `None` while it works.
fn gpu_lost(device: &WgpuDevice) -> Option<String> {
    GPU_LOST.with_borrow(|lost| {
        lost.iter()
            .find(|(d, _)| d == device)
            .map(|(_, why)| why.clone())
    })
}

/// The error for work asked of a lost device. The JS wrapper recognises it (and a trap after a
/// loss, through `globalThis.__instaflowDeviceLost`) and loads the model again on a new device.
fn device_lost_error(why: &str) -> JsError {
    JsError::new(&format!(
        "the GPU device was lost ({why}); the model must be loaded again"
    ))
}

/// Notes a lost device where the next call (and JavaScript, for a trap during a generation) sees it.
fn record_loss(device: WgpuDevice, why: String) {
    let _ = Reflect::set(
        &js_sys::global(),
        &"__instaflowDeviceLost".into(),
        &why.as_str().into(),
    );
    web_sys_console_error(&format!("instaflow: the GPU device was lost: {why}"));
    // A generation in flight may wait for a read-back that never comes: the JS wrapper ends it.
    if let Ok(notify) = Reflect::get(&js_sys::global(), &"__instaflowOnDeviceLost".into())
        .and_then(|f| f.dyn_into::<Function>())
    {
        let _ = notify.call1(&JsValue::NULL, &why.as_str().into());
    }
    GPU_LOST.with_borrow_mut(|lost| lost.push((device, why)));
}

/// The WebGPU device, set up on first use (or after a loss) to compute in f16 when `precision`
/// asks for it (or is `"auto"` and the adapter has `shader-f16`), else in f32.
async fn gpu_device(precision: &str) -> Result<WgpuDevice, JsError> {
    let current = GPU_DEVICE.with_borrow(|d| d.clone());
    let device = match current {
        Some(device) if gpu_lost(&device).is_none() => device,
        _ => {
            // A fresh id: the lost device's runtime stays registered under the old one. On the web
            // every id asks the browser for its high-performance adapter.
            let n = GPU_SETUPS.get();
            GPU_SETUPS.set(n + 1);
            let device = if n == 0 {
                WgpuDevice::default()
            } else {
                WgpuDevice::DiscreteGpu(n)
            };
            let setup = init_setup_async::<graphics::WebGpu>(&device, Default::default()).await;
            let limits = setup.device.limits();
            GPU_MAX_BUFFER.set(
                limits
                    .max_buffer_size
                    .min(limits.max_storage_buffer_binding_size as u64),
            );
            let watched = device.clone();
            setup
                .device
                .set_device_lost_callback(move |reason, message| {
                    record_loss(watched.clone(), format!("{reason:?}: {message}"))
                });
            let _ = Reflect::set(
                &js_sys::global(),
                &"__instaflowDeviceLost".into(),
                &JsValue::UNDEFINED,
            );
            GPU_F16.set(None);
            GPU_DEVICE.set(Some(device.clone()));
            device
        }
    };
    let supported = <WebGpu as Backend>::supports_dtype(&device, DType::F16);
    let want_f16 = match precision {
        "auto" => supported,
        "f16" if supported => true,
        "f16" => {
            return Err(JsError::new(
                "precision \"f16\": this GPU's WebGPU adapter lacks the `shader-f16` feature; \
                 use \"auto\" or \"f32\"",
            ));
        }
        "f32" => false,
        other => {
            return Err(JsError::new(&format!(
                "precision `{other}`: expected \"auto\", \"f16\" or \"f32\""
            )));
        }
    };
    match GPU_F16.get() {
        None => {
            if want_f16 {
                set_default_dtypes::<WebGpu>(&device, FloatDType::F16, IntDType::I32)
                    .map_err(|e| JsError::new(&format!("setting up f16 on WebGPU: {e:?}")))?;
            }
            GPU_F16.set(Some(want_f16));
        }
        Some(fixed) if fixed == want_f16 || precision == "auto" => {}
        Some(fixed) => {
            return Err(JsError::new(&format!(
                "precision \"{precision}\": this page already computes in {} on WebGPU (the \
                 float type is fixed by the first model loaded); reload the page to switch",
                precision_name(fixed)
            )));
        }
    }
    Ok(device)
}

/// `"f16"` or `"f32"`: what tensors on `device` are computed in.
fn gpu_precision(device: &WgpuDevice) -> String {
    let float: DType = burn::tensor::get_device_settings::<WebGpu>(device)
        .float_dtype
        .into();
    precision_name(float == DType::F16).into()
}

/// Most weight bytes (as f32) the CPU backend takes: its tensors live in wasm memory (4 GiB at
/// most, and the largest single allocation must fit beside everything else).
const MAX_CPU_WEIGHT_BYTES: u64 = 3 << 30;

/// wasm32 memory: 65,536 pages of 64 KiB.
const WASM_MEMORY_BYTES: u64 = 4 << 30;

/// Where a generation's tensors live, for the memory check made before anything is allocated.
enum Memory {
    /// wasm linear memory (the CPU backend): 4 GB for everything.
    Wasm,
    /// A WebGPU device, computing with `float_bytes` per value: the GPU's total memory is not
    /// exposed, but its largest buffer is.
    Gpu { float_bytes: usize },
}

/// Refuse a generation of `shape` that cannot fit where its tensors live, before anything is
/// allocated: a failed allocation would trap and take the whole module down (on the CPU), or lose
/// the device (on WebGPU). In wasm memory the weights, activations and noise must fit in 4 GB; on
/// WebGPU each tensor must fit in one buffer of the device's largest size.
fn check_memory<B: Backend>(
    pipe: &InstaFlowPipeline<B>,
    shape: [usize; 4],
    memory: Memory,
) -> Result<(), JsError> {
    let [_, _, h, w] = shape;
    let size = format!("a {}×{} image", w * pipe.vae_scale, h * pipe.vae_scale);
    let mb = |b: u64| b as f64 / 1e6;
    match memory {
        Memory::Wasm => {
            let estimate = pipe.memory_estimate(shape, 4);
            let need = estimate.device().saturating_add(estimate.noise);
            if need <= WASM_MEMORY_BYTES {
                return Ok(());
            }
            Err(JsError::new(&format!(
                "{size} needs at least {:.0} MB of wasm memory ({:.0} MB weights, {:.0} MB \
                 activations); the CPU (wasm) backend has 4 GB at most. Choose a smaller width \
                 and height, or use WebGPU",
                mb(need),
                mb(estimate.weights),
                mb(estimate.activations)
            )))
        }
        Memory::Gpu { float_bytes } => {
            let estimate = pipe.memory_estimate(shape, float_bytes);
            let limit = GPU_MAX_BUFFER.get();
            if estimate.largest_tensor <= limit {
                return Ok(());
            }
            Err(JsError::new(&format!(
                "{size} needs a GPU buffer of at least {:.0} MB ({}); this WebGPU device allows \
                 {:.0} MB per buffer. Choose a smaller width and height",
                mb(estimate.largest_tensor),
                estimate.largest_in,
                mb(limit)
            )))
        }
    }
}

enum Loading {
    Gpu(Box<StreamingLoader<WebGpu>>, WgpuDevice),
    Cpu(Box<StreamingLoader<Flex>>),
}

/// A model being loaded piece by piece: made from the folder's small files and the headers of its
/// weight files (checked against the configs at once), then fed the byte ranges listed in
/// `pieces` with `put`, then turned into an [`InstaFlow`] with `finish`.
#[wasm_bindgen]
pub struct Loader {
    loading: Loading,
    _cleanup: GpuCleanup,
}

#[wasm_bindgen]
impl Loader {
    /// `files`: relative path → `Uint8Array` for configs, tokenizer files and shard indexes, and an
    /// empty `Uint8Array` for each weight file; `headers`: weight file → its JSON header bytes;
    /// `sizes`: weight file → its length in bytes; `backend`: `"auto"`, `"webgpu"` or `"cpu"`;
    /// `pieceBytes`: the largest piece to plan; `precision` (WebGPU): `"auto"` (f16 where the
    /// adapter has `shader-f16`), `"f16"` or `"f32"`.
    pub async fn create(
        files: JsValue,
        headers: JsValue,
        sizes: JsValue,
        backend: String,
        #[wasm_bindgen(js_name = pieceBytes)] piece_bytes: f64,
        precision: Option<String>,
    ) -> Result<Loader, JsError> {
        let precision = precision.unwrap_or_else(|| "auto".into());
        let source = ModelSource::Memory {
            name: "model folder".into(),
            files: files_from_js(&files)?,
        };
        let mut parsed = BTreeMap::new();
        for (file, json) in files_from_js(&headers)? {
            let size = Reflect::get(&sizes, &file.as_str().into())
                .ok()
                .and_then(|v| v.as_f64())
                .map(|v| v as u64);
            let tensors =
                stream::parse_header(&source.display(&file), &json, size).map_err(js_error)?;
            parsed.insert(file, tensors);
        }
        let piece_bytes = if piece_bytes >= 1.0 {
            piece_bytes as u64
        } else {
            stream::DEFAULT_PIECE_BYTES
        };
        let loading = if choose_gpu(&backend).await? {
            let device = gpu_device(&precision).await?;
            let l = StreamingLoader::new(&source, &parsed, &device, piece_bytes, true)
                .map_err(js_error)?;
            Loading::Gpu(Box::new(l), device)
        } else {
            let l = StreamingLoader::new(&source, &parsed, &Default::default(), piece_bytes, true)
                .map_err(js_error)?;
            let need = l.device_bytes();
            if need > MAX_CPU_WEIGHT_BYTES {
                return Err(JsError::new(&format!(
                    "this model's weights need {:.1} GB as f32; the CPU (wasm) backend holds at most \
                     {:.1} GB (wasm memory is limited to 4 GB). Use a browser with WebGPU and about \
                     {:.1} GB of GPU memory ({:.1} GB where the GPU computes in f16)",
                    need as f64 / 1e9,
                    MAX_CPU_WEIGHT_BYTES as f64 / 1e9,
                    need as f64 / 1e9 + 1.0,
                    need as f64 / 2e9 + 0.5
                )));
            }
            Loading::Cpu(Box::new(l))
        };
        let device = match &loading {
            Loading::Gpu(_, d) => Some(d.clone()),
            Loading::Cpu(_) => None,
        };
        Ok(Loader {
            loading,
            _cleanup: GpuCleanup(device),
        })
    }

    /// The byte ranges to fetch, in order: `[file, start, end]` each (end exclusive).
    #[wasm_bindgen(getter)]
    pub fn pieces(&self) -> js_sys::Array {
        let pieces = match &self.loading {
            Loading::Gpu(l, _) => l.pieces(),
            Loading::Cpu(l) => l.pieces(),
        };
        pieces
            .iter()
            .map(|p| {
                js_sys::Array::of3(
                    &p.file.as_str().into(),
                    &(p.start as f64).into(),
                    &(p.end as f64).into(),
                )
            })
            .collect()
    }

    /// Bytes the weights occupy on the device (f32, or f16 where the GPU computes in f16).
    #[wasm_bindgen(getter, js_name = deviceBytes)]
    pub fn device_bytes(&self) -> f64 {
        match &self.loading {
            Loading::Gpu(l, _) => l.device_bytes() as f64,
            Loading::Cpu(l) => l.device_bytes() as f64,
        }
    }

    /// `webgpu` or `cpu`.
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        match self.loading {
            Loading::Gpu(..) => "webgpu".into(),
            Loading::Cpu(_) => "cpu".into(),
        }
    }

    /// The float type weights and activations will have: `f16` or `f32`.
    #[wasm_bindgen(getter)]
    pub fn precision(&self) -> String {
        match &self.loading {
            Loading::Gpu(_, device) => gpu_precision(device),
            Loading::Cpu(_) => "f32".into(),
        }
    }

    /// Give piece `index` (exactly its bytes); they are converted and uploaded before this returns,
    /// and the copy in wasm memory is dropped.
    pub fn put(&mut self, index: u32, bytes: &[u8]) -> Result<(), JsError> {
        match &mut self.loading {
            Loading::Gpu(l, device) => {
                if let Some(why) = gpu_lost(device) {
                    return Err(device_lost_error(&why));
                }
                l.put(index as usize, bytes).map_err(js_error)?;
                // burn's WebGPU runtime queues uploads, each holding its host copy, until 32 tasks
                // have gathered; submitting now frees this piece's wasm memory before the next.
                <WgpuRuntime as cubecl::Runtime>::client(device)
                    .flush()
                    .map_err(|e| JsError::new(&format!("device error while uploading: {e:?}")))
            }
            Loading::Cpu(l) => l.put(index as usize, bytes).map_err(js_error),
        }
    }

    /// The loaded model (every piece must have been given).
    pub fn finish(self) -> Result<InstaFlow, JsError> {
        let Loader { loading, _cleanup } = self;
        let engine = match loading {
            Loading::Gpu(l, device) => {
                Engine::Gpu(Box::new((*l).finish().map_err(js_error)?), device)
            }
            Loading::Cpu(l) => Engine::Cpu(Box::new((*l).finish().map_err(js_error)?)),
        };
        Ok(InstaFlow { engine, _cleanup })
    }
}

#[wasm_bindgen]
impl InstaFlow {
    /// The backend in use: `webgpu` or `cpu`.
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        match self.engine {
            Engine::Gpu(..) => "webgpu".into(),
            Engine::Cpu(_) => "cpu".into(),
        }
    }

    /// The float type of the computation: `f16` (WebGPU with `shader-f16`) or `f32`.
    #[wasm_bindgen(getter)]
    pub fn precision(&self) -> String {
        match &self.engine {
            Engine::Gpu(_, device) => gpu_precision(device),
            Engine::Cpu(_) => "f32".into(),
        }
    }

    /// Shape of the initial noise `[1, C, h, w]` (what `noise` in [`InstaFlow::generate`] must hold).
    #[wasm_bindgen(getter, js_name = noiseShape)]
    pub fn noise_shape(&self) -> Vec<u32> {
        let cfg = match &self.engine {
            Engine::Gpu(p, _) => &p.unet_config,
            Engine::Cpu(p) => &p.unet_config,
        };
        let (h, w) = cfg.latent_size();
        [1, cfg.in_channels, h, w].map(|d| d as u32).to_vec()
    }

    /// Generate one image. The initial noise is `noise` (`[1, C, h, w]` flattened) if given, else
    /// drawn from `seed` with the native CLI's generator (same seed, same image); `steps` Euler
    /// steps; guidance α (1: one UNet call per step). `latents` also returns the final latents.
    /// `width`/`height` (0: the model's own size) set the image size.
    #[allow(clippy::too_many_arguments)]
    pub async fn generate(
        &self,
        prompt: String,
        seed: u32,
        noise: Option<Vec<f32>>,
        steps: u32,
        guidance: f64,
        latents: bool,
        width: u32,
        height: u32,
    ) -> Result<GeneratedImage, JsError> {
        if steps == 0 || !guidance.is_finite() {
            return Err(JsError::new(
                "steps must be ≥ 1 and guidance a finite number",
            ));
        }
        let request = Request {
            prompt,
            seed,
            noise,
            opts: GenerateOptions {
                steps: steps as usize,
                guidance,
            },
            latents,
            size: [width, height].map(|v| (v > 0).then_some(v as usize)),
        };
        let mut image = match &self.engine {
            Engine::Gpu(pipe, device) => {
                if let Some(why) = gpu_lost(device) {
                    return Err(device_lost_error(&why));
                }
                let float_bytes = if GPU_F16.get() == Some(true) { 2 } else { 4 };
                let result = run(pipe, device, request, Memory::Gpu { float_bytes }).await;
                // A loss during the run surfaces as whatever failed first; name the cause.
                match gpu_lost(device) {
                    Some(why) => return Err(device_lost_error(&why)),
                    None => result?,
                }
            }
            Engine::Cpu(pipe) => run(pipe, &Default::default(), request, Memory::Wasm).await?,
        };
        image.backend = self.backend();
        Ok(image)
    }
}

/// One generation call's inputs.
struct Request {
    prompt: String,
    seed: u32,
    noise: Option<Vec<f32>>,
    opts: GenerateOptions,
    latents: bool,
    size: [Option<usize>; 2],
}

/// Waits for each stage of a generation with an awaited read-back (a browser cannot block), so
/// stage timings mean finished work.
struct Settle;

impl<B: Backend> StageHook<B> for Settle {
    async fn settle(&mut self, probe: Tensor<B, 1>) -> Result<(), String> {
        probe
            .into_data_async()
            .await
            .map(|_| ())
            .map_err(|e| format!("device error: {e:?}"))
    }
}

async fn run<B: Backend>(
    pipe: &InstaFlowPipeline<B>,
    device: &B::Device,
    req: Request,
    memory: Memory,
) -> Result<GeneratedImage, JsError> {
    let start = now_ms();
    let shape = pipe
        .latent_shape(1, req.size[0], req.size[1])
        .map_err(|e| JsError::new(&e))?;
    check_memory(pipe, shape, memory)?;
    let [_, _, h, w] = shape;
    let noise = match req.noise {
        Some(values) => InitialNoise::Values(values),
        // Same generator as the native CLI: the same seed gives the same image.
        None => InitialNoise::Seed(req.seed as u64),
    };
    let noise = pipe
        .initial_noise(shape, noise, device)
        .map_err(|e| JsError::new(&e))?;
    let Generated {
        latents,
        pixels,
        timings,
    } = pipe
        .generate(&req.prompt, "", noise, req.opts, &mut Settle)
        .await
        .map_err(|e| JsError::new(&e))?;
    let latent_values = if req.latents {
        let data = latents
            .into_data_async()
            .await
            .map_err(|e| JsError::new(&format!("reading latents back: {e:?}")))?;
        Some(
            data.convert::<f32>()
                .to_vec()
                .map_err(|e| JsError::new(&format!("{e:?}")))?,
        )
    } else {
        None
    };
    let mut images = to_rgba8_async(pixels).await.map_err(|e| JsError::new(&e))?;
    let end = now_ms();
    let scale = pipe.vae_scale;
    Ok(GeneratedImage {
        width: (w * scale) as u32,
        height: (h * scale) as u32,
        rgba: images.remove(0),
        latents: latent_values,
        backend: String::new(),
        encode_ms: timings.encode_ms,
        unet_ms: timings.unet_ms(),
        decode_ms: timings.decode_ms,
        total_ms: end - start,
    })
}
