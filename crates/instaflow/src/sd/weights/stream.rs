//! Loading a diffusers folder tensor by tensor, for callers that fetch bytes themselves (a browser
//! reading HTTP ranges): parse each safetensors header, check every name and shape against the
//! model the configs describe *before* any weight byte is read, then take the weights in pieces
//! of bounded size, each converted to f32 and uploaded to the device as it arrives, so host
//! memory never holds more than one piece.
//!
//! ```text
//! StreamingLoader::new(small files + headers) ── validates ──► pieces(): [(file, byte range)]
//! for each piece: put(i, bytes)                  ── f16/bf16/f32 → f32 → device
//! finish()                                       ──► InstaFlowPipeline
//! ```
//!
//! Tensors larger than a piece are split along their first dimension and concatenated on the
//! device, which keeps the host (wasm) memory peak near one piece even for CLIP's 38 M-value
//! token embedding.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

pub use super::layout::checkpoint_layout;
use super::layout::{Expected, ParamLister, ParamSetter};
use super::{
    CLIP_REMAPS, COMPONENTS, WeightFile, WeightsError, canonical, ignorable, list, weight_files,
};
use crate::sd::pipeline::{InstaFlowPipeline, LoadError, init_components};
use crate::sd::source::ModelSource;

/// Bytes of a safetensors file before its JSON header (the header's length, u64 little-endian).
pub const PREFIX_BYTES: u64 = 8;
/// Largest header accepted (safetensors' own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Default piece size: small enough that a browser's wasm heap stays far below its limits.
pub const DEFAULT_PIECE_BYTES: u64 = 16 << 20;

/// One tensor listed in a safetensors header, with absolute byte offsets in its file.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderTensor {
    /// The tensor's name in the file.
    pub name: String,
    /// F32, F16 or BF16.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<usize>,
    /// First byte in the file.
    pub start: u64,
    /// One past the last byte in the file.
    pub end: u64,
}

fn unreadable(file: &str, message: impl Into<String>) -> WeightsError {
    WeightsError::Unreadable {
        path: file.to_string(),
        message: message.into(),
    }
}

/// The length of the JSON header that follows the first [`PREFIX_BYTES`] bytes of `file`.
pub fn header_length(file: &str, prefix: &[u8]) -> Result<u64, WeightsError> {
    let bytes: [u8; 8] = prefix
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| unreadable(file, "not a safetensors file (shorter than 8 bytes)"))?;
    let n = u64::from_le_bytes(bytes);
    if n == 0 || n > MAX_HEADER_BYTES {
        return Err(unreadable(
            file,
            format!("not a valid safetensors file (header length {n})"),
        ));
    }
    Ok(n)
}

/// Parse the JSON header of `file` (the bytes after the 8-byte length). `file_len`, when known,
/// is checked against the data the header declares.
pub fn parse_header(
    file: &str,
    json: &[u8],
    file_len: Option<u64>,
) -> Result<Vec<HeaderTensor>, WeightsError> {
    let bad = |m: String| unreadable(file, format!("not a valid safetensors header: {m}"));
    let map: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    let data_start = PREFIX_BYTES + json.len() as u64;
    let mut tensors = Vec::new();
    for (name, entry) in map {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| entry.get(k).ok_or_else(|| bad(format!("{name}: no `{k}`")));
        // Every safetensors dtype is read (CLIP files carry I64 `position_ids`); the loaders
        // accept floats only for weights.
        let dtype = match field("dtype")?.as_str() {
            Some("F64") => DType::F64,
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("I64") => DType::I64,
            Some("I32") => DType::I32,
            Some("I16") => DType::I16,
            Some("I8") => DType::I8,
            Some("U64") => DType::U64,
            Some("U32") => DType::U32,
            Some("U16") => DType::U16,
            Some("U8") => DType::U8,
            Some("BOOL") => DType::Bool(burn::tensor::BoolStore::Native),
            other => {
                return Err(unreadable(file, format!("{name}: unknown dtype {other:?}")));
            }
        };
        let ints = |k: &str| -> Result<Vec<u64>, WeightsError> {
            field(k)?
                .as_array()
                .and_then(|a| a.iter().map(|v| v.as_u64()).collect::<Option<Vec<_>>>())
                .ok_or_else(|| bad(format!("{name}: `{k}` is not a list of integers")))
        };
        let shape = ints("shape")?;
        let offsets = ints("data_offsets")?;
        let [begin, end] = offsets[..] else {
            return Err(bad(format!("{name}: `data_offsets` needs two values")));
        };
        let elements = shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad(format!("{name}: shape {shape:?} overflows")))?;
        let size = dtype.size() as u64;
        if end < begin || elements.checked_mul(size) != Some(end - begin) {
            return Err(bad(format!(
                "{name}: shape {shape:?} × {size} bytes does not match data_offsets [{begin}, {end}]"
            )));
        }
        let (start, end) = (data_start + begin, data_start + end);
        if let Some(len) = file_len
            && end > len
        {
            return Err(unreadable(
                file,
                format!("truncated: {name} ends at byte {end}, the file has {len}"),
            ));
        }
        tensors.push(HeaderTensor {
            name,
            dtype,
            shape: shape.into_iter().map(|d| d as usize).collect(),
            start,
            end,
        });
    }
    Ok(tensors)
}

/// A contiguous byte range of one weight file that [`StreamingLoader::put`] takes in one call.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The file, relative to the model folder (`unet/diffusion_pytorch_model.safetensors`).
    pub file: String,
    /// First byte in the file.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// One tensor being assembled from pieces.
struct Pending<B: Backend> {
    component: usize,
    name: String,
    expected: Expected,
    dtype: DType,
    /// Values per row (product of the file shape after dimension 0).
    row: usize,
    parts: Vec<Option<Tensor<B, 2>>>,
}

/// Which part of which tensor a piece fills.
#[derive(Debug, Clone, Copy)]
struct Slot {
    tensor: usize,
    part: usize,
    rows: usize,
}

/// Loads an [`InstaFlowPipeline`] from headers first and weights piece by piece.
pub struct StreamingLoader<B: Backend> {
    pipeline: InstaFlowPipeline<B>,
    device: B::Device,
    pieces: Vec<Piece>,
    slots: Vec<Slot>,
    pending: Vec<Pending<B>>,
    done: [HashMap<String, Tensor<B, 2>>; 3],
    loaded: Vec<bool>,
    param_bytes: u64,
}

impl<B: Backend> std::fmt::Debug for StreamingLoader<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StreamingLoader({} pieces, {} tensors)",
            self.pieces.len(),
            self.pending.len()
        )
    }
}

impl<B: Backend> StreamingLoader<B> {
    /// Plan the load of a diffusers folder. `source` holds the small files (configs, tokenizer,
    /// shard indexes) and names every weight file (its contents are not read); `headers` maps each
    /// weight file to its parsed header. Fails, naming the tensors, when a header does not fit
    /// the model the configs describe. `skip_vae_encoder` leaves out the VAE's encoder (generation
    /// only decodes). Tensors larger than `piece_bytes` are split along dimension 0.
    pub fn new(
        source: &ModelSource,
        headers: &BTreeMap<String, Vec<HeaderTensor>>,
        device: &B::Device,
        piece_bytes: u64,
        skip_vae_encoder: bool,
    ) -> Result<Self, LoadError> {
        let pipeline = init_components(source, device)?;
        let mut pieces = Vec::new();
        let mut slots = Vec::new();
        let mut pending = Vec::new();
        let mut param_bytes = 0;
        for (component, (dir, stems)) in COMPONENTS.iter().enumerate() {
            let mut lister = ParamLister::default();
            match component {
                0 => pipeline.text_encoder.visit(&mut lister),
                1 => pipeline.unet.visit(&mut lister),
                _ => match &pipeline.vae {
                    Some(vae) => vae.visit(&mut lister),
                    None => continue,
                },
            }
            let extra: &[(&str, &str)] = if component == 0 { CLIP_REMAPS } else { &[] };
            let skip = |name: &str| {
                component == 2
                    && skip_vae_encoder
                    && (name.starts_with("encoder.") || name.starts_with("quant_conv."))
            };
            let mut expected = lister.by_name;
            expected.retain(|name, _| !skip(name));
            let files = weight_files(source, dir, stems)?;
            let mut problems = [Vec::new(), Vec::new(), Vec::new()];
            let mut seen = BTreeSet::new();
            for WeightFile(file) in &files {
                let header = headers.get(file).ok_or_else(|| {
                    LoadError::Weights(unreadable(&source.display(file), "header not read"))
                })?;
                for t in header {
                    let name = canonical(&t.name, extra);
                    if ignorable(&name) || skip(&name) {
                        continue;
                    }
                    let Some(exp) = expected.get(&name) else {
                        problems[1].push(t.name.clone());
                        continue;
                    };
                    if !seen.insert(name.clone()) {
                        problems[2].push(format!("{}: stored twice", t.name));
                    } else if let Some(message) = not_a_weight_dtype(t.dtype) {
                        problems[2].push(format!("{}: {message}", t.name));
                    } else if t.shape != exp.file_shape {
                        problems[2].push(format!(
                            "{}: expected shape {:?}, file has {:?}",
                            t.name, exp.file_shape, t.shape
                        ));
                    } else {
                        let index = pending.len();
                        let rows = t.shape.first().copied().unwrap_or(1).max(1);
                        let row = t.shape.iter().skip(1).product::<usize>();
                        let row_bytes = (t.end - t.start) / rows as u64;
                        let per_piece = (piece_bytes / row_bytes.max(1)).max(1) as usize;
                        let mut part = 0;
                        for first in (0..rows).step_by(per_piece) {
                            let n = per_piece.min(rows - first);
                            let start = t.start + first as u64 * row_bytes;
                            pieces.push(Piece {
                                file: file.clone(),
                                start,
                                end: start + n as u64 * row_bytes,
                            });
                            slots.push(Slot {
                                tensor: index,
                                part,
                                rows: n,
                            });
                            part += 1;
                        }
                        param_bytes += 4 * t.shape.iter().product::<usize>() as u64;
                        pending.push(Pending {
                            component,
                            name: t.name.clone(),
                            expected: exp.clone(),
                            dtype: t.dtype,
                            row,
                            parts: vec![None; part],
                        });
                    }
                }
            }
            let missing: Vec<String> = expected
                .keys()
                .filter(|n| !seen.contains(*n))
                .cloned()
                .collect();
            problems[0] = missing;
            if problems.iter().any(|p| !p.is_empty()) {
                let mut details = String::new();
                list("tensors missing from the file", &problems[0], &mut details);
                list("unexpected tensors in the file", &problems[1], &mut details);
                list(
                    "tensors of the wrong shape or type",
                    &problems[2],
                    &mut details,
                );
                return Err(LoadError::Weights(WeightsError::Mismatch {
                    path: files
                        .first()
                        .map(|f| source.display(&f.0))
                        .unwrap_or_default(),
                    details,
                }));
            }
        }
        Ok(Self {
            loaded: vec![false; pieces.len()],
            pipeline,
            device: device.clone(),
            pieces,
            slots,
            pending,
            done: Default::default(),
            param_bytes,
        })
    }

    /// The byte ranges to read, in file order; each goes to [`Self::put`] with its index.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Bytes the weights take on the device, in the float type it computes in (f32, or f16 where
    /// the device's default float type was set to f16).
    pub fn device_bytes(&self) -> u64 {
        let float: DType = burn::tensor::get_device_settings::<B>(&self.device)
            .float_dtype
            .into();
        self.param_bytes / 4 * float.size() as u64
    }

    /// Convert piece `index`'s bytes to f32 and upload them; a tensor whose pieces have all
    /// arrived is assembled on the device.
    pub fn put(&mut self, index: usize, bytes: &[u8]) -> Result<(), LoadError> {
        let (piece, slot) = match (self.pieces.get(index), self.slots.get(index)) {
            (Some(p), Some(s)) => (p, *s),
            _ => {
                return Err(LoadError::Weights(unreadable(
                    "weights",
                    format!(
                        "piece {index} does not exist ({} pieces)",
                        self.pieces.len()
                    ),
                )));
            }
        };
        if bytes.len() as u64 != piece.end - piece.start {
            return Err(LoadError::Weights(unreadable(
                &piece.file,
                format!(
                    "bytes {}..{}: got {} bytes, expected {}",
                    piece.start,
                    piece.end,
                    bytes.len(),
                    piece.end - piece.start
                ),
            )));
        }
        if std::mem::replace(&mut self.loaded[index], true) {
            return Err(LoadError::Weights(unreadable(
                &piece.file,
                format!("bytes {}..{} were given twice", piece.start, piece.end),
            )));
        }
        let t = &mut self.pending[slot.tensor];
        let values = to_f32(bytes, t.dtype);
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(LoadError::Weights(unreadable(
                &piece.file,
                format!("{}: value {i} of this part is not finite", t.name),
            )));
        }
        let part = Tensor::from_data(
            TensorData::new(values, [slot.rows, t.row.max(1)]),
            &self.device,
        );
        t.parts[slot.part] = Some(part);
        if t.parts.iter().all(Option::is_some) {
            let parts: Vec<_> = t.parts.iter_mut().filter_map(Option::take).collect();
            let mut full = Tensor::cat(parts, 0);
            if t.expected.transpose {
                full = full.transpose();
            }
            self.done[t.component].insert(t.expected.path.clone(), full);
        }
        Ok(())
    }

    /// Pieces not given yet.
    pub fn remaining(&self) -> usize {
        self.loaded.iter().filter(|l| !**l).count()
    }

    /// Put the assembled tensors into the models; every piece must have been given.
    pub fn finish(mut self) -> Result<InstaFlowPipeline<B>, LoadError> {
        if let Some(i) = self.loaded.iter().position(|l| !l) {
            let p = &self.pieces[i];
            return Err(LoadError::Weights(unreadable(
                &p.file,
                format!(
                    "bytes {}..{} were never given ({} pieces missing)",
                    p.start,
                    p.end,
                    self.remaining()
                ),
            )));
        }
        let [text, unet, vae] = std::mem::take(&mut self.done);
        let mut p = self.pipeline;
        p.text_encoder = p.text_encoder.map(&mut ParamSetter::new(text));
        p.unet = p.unet.map(&mut ParamSetter::new(unet));
        p.vae = p.vae.map(|v| v.map(&mut ParamSetter::new(vae)));
        Ok(p)
    }
}

/// Why a tensor of `dtype` cannot be a weight (`None`: it can).
pub(super) fn not_a_weight_dtype(dtype: DType) -> Option<String> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => None,
        other => Some(format!(
            "dtype {other:?} (weights must be F32, F16 or BF16)"
        )),
    }
}

/// Little-endian f32/f16/bf16 bytes → f32 values.
fn to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    let dtype = match dtype {
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        _ => safetensors::Dtype::F32,
    };
    crate::sd::convert::floats(dtype, bytes).expect("a float dtype")
}

/// Read the header of `rel` from a folder on disk (native use and tests).
pub fn read_header_from(source: &ModelSource, rel: &str) -> Result<Vec<HeaderTensor>, LoadError> {
    use std::io::{Read, Seek, SeekFrom};
    let name = source.display(rel);
    let path = source
        .path(rel)
        .ok_or_else(|| LoadError::Weights(unreadable(&name, "not a file on disk")))?;
    let io = |e: std::io::Error| LoadError::Weights(unreadable(&name, e.to_string()));
    let mut f = std::fs::File::open(&path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut prefix = [0u8; 8];
    f.read_exact(&mut prefix).map_err(io)?;
    let n = header_length(&name, &prefix)?;
    let mut json = vec![0u8; n as usize];
    f.seek(SeekFrom::Start(8)).map_err(io)?;
    f.read_exact(&mut json).map_err(io)?;
    Ok(parse_header(&name, &json, Some(len))?)
}

/// Load a folder on disk the way a browser loads one over HTTP: every header first, then the
/// weights piece by piece (tests, and a check that both loaders agree).
pub fn load_dir_streaming<B: Backend>(
    source: &ModelSource,
    device: &B::Device,
    piece_bytes: u64,
    skip_vae_encoder: bool,
) -> Result<InstaFlowPipeline<B>, LoadError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut headers = BTreeMap::new();
    for (dir, stems) in COMPONENTS {
        if !source.has_dir(dir) {
            continue;
        }
        for WeightFile(file) in weight_files(source, dir, stems)? {
            let header = read_header_from(source, &file)?;
            headers.insert(file, header);
        }
    }
    let mut loader = StreamingLoader::new(source, &headers, device, piece_bytes, skip_vae_encoder)?;
    for i in 0..loader.pieces().len() {
        let p = loader.pieces()[i].clone();
        let name = source.display(&p.file);
        let io = |e: std::io::Error| LoadError::Weights(unreadable(&name, e.to_string()));
        let mut f = std::fs::File::open(source.path(&p.file).unwrap_or_default()).map_err(io)?;
        f.seek(SeekFrom::Start(p.start)).map_err(io)?;
        let mut bytes = vec![0u8; (p.end - p.start) as usize];
        f.read_exact(&mut bytes).map_err(io)?;
        loader.put(i, &bytes)?;
    }
    loader.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sd::pipeline::GenerateOptions;
    use crate::test_util::{TB, device, parity_folder, to_vec};

    fn fixture(name: &str) -> ModelSource {
        parity_folder(name, "stream")
    }

    fn latents(p: &InstaFlowPipeline<TB>) -> Vec<f32> {
        let (h, w) = p.unet_config.latent_size();
        let noise = crate::flow::noise::gaussian::<TB, 4>(
            &mut crate::flow::noise::rng(7),
            [1, p.unet_config.in_channels, h, w],
            &device(),
        );
        let opts = GenerateOptions {
            steps: 2,
            guidance: 1.5,
        };
        let (text, neg) = p
            .encode_for_guidance(&["a red heart"], &[""], opts.guidance, &device())
            .unwrap();
        to_vec(p.decode(p.sample(noise, &text, &neg, opts)))
    }

    #[test]
    fn streaming_in_small_pieces_equals_the_whole_file_loader() {
        for name in ["conv-f32", "linear-f16", "small-bf16"] {
            let source = fixture(name);
            let whole = InstaFlowPipeline::<TB>::load(&source, &device()).unwrap();
            // 1 KiB pieces split most tensors (and CLIP's embedding) into many parts.
            let streamed = load_dir_streaming::<TB>(&source, &device(), 1024, true).unwrap();
            // Same weights; the streamed Linear weights are transposed views, the whole-file
            // loader's are contiguous, so products sum in another order (float rounding only).
            let worst = crate::test_util::max_abs_diff(&latents(&whole), &latents(&streamed));
            assert!(worst <= 1e-5, "{name}: max |Δ| {worst}");
        }
    }

    #[test]
    fn pieces_are_bounded_and_cover_every_tensor_once() {
        let source = fixture("conv-f32");
        let mut headers = BTreeMap::new();
        for file in [
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ] {
            headers.insert(file.to_string(), read_header_from(&source, file).unwrap());
        }
        let loader = StreamingLoader::<TB>::new(&source, &headers, &device(), 4096, false).unwrap();
        let mut covered: BTreeMap<&str, u64> = BTreeMap::new();
        for p in loader.pieces() {
            assert!(p.end - p.start <= 4096 || p.end > p.start, "{p:?}");
            *covered.entry(p.file.as_str()).or_default() += p.end - p.start;
        }
        for (file, header) in &headers {
            let bytes: u64 = header
                .iter()
                .filter(|t| !t.name.ends_with("position_ids"))
                .map(|t| t.end - t.start)
                .sum();
            assert_eq!(covered[file.as_str()], bytes, "{file}");
        }
        assert!(loader.pieces().iter().all(|p| p.end - p.start <= 4096));
    }

    #[test]
    fn a_wrong_shape_in_a_header_fails_before_any_weight_is_read() {
        let source = fixture("conv-f32");
        let file = "unet/diffusion_pytorch_model.safetensors";
        let mut headers = BTreeMap::new();
        for f in [
            "text_encoder/model.safetensors",
            file,
            "vae/diffusion_pytorch_model.safetensors",
        ] {
            headers.insert(f.to_string(), read_header_from(&source, f).unwrap());
        }
        let t = headers
            .get_mut(file)
            .unwrap()
            .iter_mut()
            .find(|t| t.name == "conv_in.weight")
            .unwrap();
        t.shape[0] += 1;
        headers
            .get_mut(file)
            .unwrap()
            .retain(|t| t.name != "conv_out.bias");
        let err = StreamingLoader::<TB>::new(&source, &headers, &device(), 1 << 20, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("conv_in.weight: expected shape"), "{err}");
        assert!(err.contains("conv_out.bias"), "{err}");
    }

    #[test]
    fn pieces_of_the_wrong_length_or_given_twice_are_refused() {
        let source = fixture("linear-f16");
        let mut headers = BTreeMap::new();
        for (dir, stems) in COMPONENTS {
            for WeightFile(f) in weight_files(&source, dir, stems).unwrap() {
                headers.insert(f.clone(), read_header_from(&source, &f).unwrap());
            }
        }
        let mut loader =
            StreamingLoader::<TB>::new(&source, &headers, &device(), 1 << 20, true).unwrap();
        let n = (loader.pieces()[0].end - loader.pieces()[0].start) as usize;
        assert!(loader.put(0, &vec![0; n + 2]).is_err());
        loader.put(0, &vec![0; n]).unwrap();
        assert!(
            loader
                .put(0, &vec![0; n])
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(loader.put(usize::MAX, &[]).is_err());
        let err = loader.finish().unwrap_err().to_string();
        assert!(err.contains("never given"), "{err}");
    }

    #[test]
    fn headers_are_checked() {
        assert!(header_length("f", &[1, 2]).is_err());
        assert!(header_length("f", &u64::MAX.to_le_bytes()).is_err());
        let ok = br#"{"a":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},"__metadata__":{"x":"y"}}"#;
        let t = parse_header("f", ok, None).unwrap();
        assert_eq!(t[0].shape, vec![2, 3]);
        assert_eq!(t[0].start, 8 + ok.len() as u64);
        assert!(
            parse_header("f", ok, Some(20))
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        // Integer tensors are listed (CLIP's position ids); the loaders refuse them as weights.
        let ids = br#"{"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
        assert_eq!(parse_header("f", ids, None).unwrap()[0].dtype, DType::I64);
        assert!(not_a_weight_dtype(DType::I64).unwrap().contains("I64"));
        for bad in [
            &br#"{"a":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}"#[..],
            br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            br#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,4]}}"#,
            br#"{"a":{"dtype":"F32","shape":[1]}}"#,
            br#"not json"#,
        ] {
            assert!(parse_header("f", bad, None).is_err());
        }
    }
}
