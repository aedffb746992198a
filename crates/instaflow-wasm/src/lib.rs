//! InstaFlow in the browser: wasm-bindgen bindings over the `instaflow` core crate. One-step (or
//! N-step) generation runs on burn's WebGPU backend, or on its CPU backend compiled to wasm when
//! the browser offers no WebGPU adapter.

use std::collections::BTreeMap;

use burn::backend::wgpu::{WgpuDevice, graphics, init_setup_async};
use burn::backend::{Flex, WebGpu};
use burn::tensor::backend::Backend;
use instaflow::pipeline::{GenerateOptions, InstaFlowPipeline, to_rgba8_async};
use instaflow::source::ModelSource;
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

/// A generated image: RGBA bytes for a canvas `ImageData`, and how it was made.
#[wasm_bindgen]
pub struct GeneratedImage {
    width: u32,
    height: u32,
    rgba: Vec<u8>,
    backend: String,
    millis: f64,
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
    /// Pixels, 4 bytes each (RGBA).
    #[wasm_bindgen(getter)]
    pub fn rgba(&self) -> js_sys::Uint8ClampedArray {
        js_sys::Uint8ClampedArray::from(self.rgba.as_slice())
    }
    /// `webgpu` or `cpu`.
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        self.backend.clone()
    }
    /// Wall time of the generation in milliseconds.
    #[wasm_bindgen(getter)]
    pub fn millis(&self) -> f64 {
        self.millis
    }
}

/// A loaded InstaFlow model.
#[wasm_bindgen]
pub struct InstaFlow {
    engine: Engine,
}

fn now_ms() -> f64 {
    js_sys::Date::now()
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

#[wasm_bindgen]
impl InstaFlow {
    /// Load a model from its files. Uses WebGPU when the browser provides an adapter and
    /// `allowGpu` is true, else the CPU backend.
    #[wasm_bindgen(js_name = fromFiles)]
    pub async fn from_files(files: JsValue, allow_gpu: bool) -> Result<InstaFlow, JsError> {
        let source = ModelSource::Memory {
            name: "model".into(),
            files: files_from_js(&files)?,
        };
        let engine = if allow_gpu && webgpu_adapter_available().await {
            let device = WgpuDevice::default();
            init_setup_async::<graphics::WebGpu>(&device, Default::default()).await;
            Engine::Gpu(
                Box::new(
                    InstaFlowPipeline::load(&source, &device)
                        .map_err(|e| JsError::new(&e.to_string()))?,
                ),
                device,
            )
        } else {
            Engine::Cpu(Box::new(
                InstaFlowPipeline::load(&source, &Default::default())
                    .map_err(|e| JsError::new(&e.to_string()))?,
            ))
        };
        Ok(InstaFlow { engine })
    }

    /// The backend in use: `webgpu` or `cpu`.
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        match self.engine {
            Engine::Gpu(..) => "webgpu".into(),
            Engine::Cpu(_) => "cpu".into(),
        }
    }

    /// Generate one image from `prompt` with noise from `seed`, `steps` Euler steps and guidance α.
    pub async fn generate(
        &self,
        prompt: String,
        seed: u32,
        steps: u32,
        guidance: f64,
    ) -> Result<GeneratedImage, JsError> {
        if steps == 0 || !guidance.is_finite() {
            return Err(JsError::new(
                "steps must be ≥ 1 and guidance a finite number",
            ));
        }
        let opts = GenerateOptions {
            steps: steps as usize,
            guidance,
        };
        let start = now_ms();
        let (width, height, rgba) = match &self.engine {
            Engine::Gpu(pipe, device) => run(pipe, device, &prompt, seed, opts).await?,
            Engine::Cpu(pipe) => run(pipe, &Default::default(), &prompt, seed, opts).await?,
        };
        Ok(GeneratedImage {
            width,
            height,
            rgba,
            backend: self.backend(),
            millis: now_ms() - start,
        })
    }
}

async fn run<B: Backend>(
    pipe: &InstaFlowPipeline<B>,
    device: &B::Device,
    prompt: &str,
    seed: u32,
    opts: GenerateOptions,
) -> Result<(u32, u32, Vec<u8>), JsError> {
    let text = pipe
        .encode_prompts(&[prompt], device)
        .map_err(|e| JsError::new(&e.to_string()))?;
    let negative = pipe
        .encode_prompts(&[""], device)
        .map_err(|e| JsError::new(&e.to_string()))?;
    let (h, w) = pipe.unet_config.latent_size();
    let shape = [1, pipe.unet_config.in_channels, h, w];
    // Same generator as the native CLI: the same seed gives the same image.
    let noise =
        instaflow::noise::gaussian::<B, 4>(&mut instaflow::noise::rng(seed as u64), shape, device);
    let latents = pipe.sample(noise, &text, &negative, opts);
    let mut images = to_rgba8_async(pipe.decode(latents))
        .await
        .map_err(|e| JsError::new(&e))?;
    let scale = pipe.vae_scale;
    Ok(((w * scale) as u32, (h * scale) as u32, images.remove(0)))
}
