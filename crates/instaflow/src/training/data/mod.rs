//! Caption–image data sets for text-to-image training, prepared once from registry packages.
//!
//! A prepared data set is a folder with two files:
//! * `images.safetensors` — `images`: u8 `[N, C, H, W]`, `labels`: i64 `[N]` (class or −1);
//! * `dataset.json` — name, source, licence, class names and the captions of every image.
//!
//! Pixels are mapped to `[-1, 1]` for training, the range the pipeline decodes from.

pub mod emoji;
pub mod mnist;
pub mod shapes;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData, backend::Backend};
use rand::Rng;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

/// Problems reading or preparing data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder is missing.
    #[error("{0} not found")]
    Missing(String),
    /// A file exists but is not what was expected.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Writing failed.
    #[error("writing {path}: {message}")]
    Write {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
}

pub(crate) fn invalid(path: &Path, message: impl ToString) -> DataError {
    DataError::Invalid {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn write_err(path: &Path, e: impl ToString) -> DataError {
    DataError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Write `bytes` to `path` through a temporary file and a rename, so a crash never leaves a
/// half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    // Data on disk before the rename (else a power cut can leave an empty file under the final
    // name); the temporary file is removed when anything fails, e.g. a full disk.
    let written = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(&tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(path, e));
    }
    // The rename itself is durable once the folder is synced (not possible on every platform).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Captions and class of one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Index into [`ImageTextDataset::classes`], if the data set has classes.
    pub label: Option<usize>,
    /// Captions describing the image (one is drawn per training step).
    pub captions: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    name: String,
    source: String,
    licence: String,
    channels: usize,
    height: usize,
    width: usize,
    classes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    attributes: Vec<String>,
    items: Vec<Item>,
}

/// Images with captions (and optionally class labels), held in memory as bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTextDataset {
    /// Short name ("mnist", "emoji").
    pub name: String,
    /// Where the data came from (package and version).
    pub source: String,
    /// Licence notice that travels with anything derived from the data.
    pub licence: String,
    /// Channels per image (1 or 3).
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Pixels `[N, C, H, W]`, 0–255.
    pub images: Vec<u8>,
    /// Class names (empty if the data has no classes).
    pub classes: Vec<String>,
    /// What each word of a class name stands for (`["colour", "shape"]` for "red heart"), when
    /// class names are made of such words; empty otherwise. `eval` reports accuracy per attribute.
    pub attributes: Vec<String>,
    /// Captions and label of every image.
    pub items: Vec<Item>,
}

impl ImageTextDataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Values per image (`C·H·W`).
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Pixels of images `indices` in `[-1, 1]`, `[B, C, H, W]`.
    pub fn pixels<B: Backend>(&self, indices: &[usize], device: &B::Device) -> Tensor<B, 4> {
        let n = self.image_len();
        let values: Vec<f32> = indices
            .iter()
            .flat_map(|&i| &self.images[i * n..(i + 1) * n])
            .map(|&p| p as f32 / 127.5 - 1.0)
            .collect();
        Tensor::from_data(
            TensorData::new(
                values,
                [indices.len(), self.channels, self.height, self.width],
            ),
            device,
        )
    }

    /// One caption of image `i`, drawn with `rng`.
    pub fn caption(&self, i: usize, rng: &mut impl Rng) -> &str {
        let c = &self.items[i].captions;
        &c[rng.random_range(0..c.len())]
    }

    /// Every distinct caption, sorted (a prompt set D_T for pair generation).
    pub fn all_captions(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.items.iter().flat_map(|i| &i.captions).collect();
        set.into_iter().cloned().collect()
    }

    /// The images `indices`, as a new data set.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let n = self.image_len();
        Self {
            images: indices
                .iter()
                .flat_map(|&i| self.images[i * n..(i + 1) * n].iter().copied())
                .collect(),
            items: indices.iter().map(|&i| self.items[i].clone()).collect(),
            ..self.clone()
        }
    }

    /// Write `images.safetensors` and `dataset.json` (and `LICENCE.txt`) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), DataError> {
        std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
        let labels: Vec<u8> = self
            .items
            .iter()
            .flat_map(|i| i.label.map_or(-1, |l| l as i64).to_le_bytes())
            .collect();
        let shape = vec![self.len(), self.channels, self.height, self.width];
        let images =
            TensorView::new(Dtype::U8, shape, &self.images).map_err(|e| write_err(dir, e))?;
        let labels = TensorView::new(Dtype::I64, vec![self.len()], &labels)
            .map_err(|e| write_err(dir, e))?;
        let bytes = safetensors::serialize([("images", images), ("labels", labels)], None)
            .map_err(|e| write_err(dir, e))?;
        write_atomic(&dir.join("images.safetensors"), &bytes)?;
        let manifest = Manifest {
            name: self.name.clone(),
            source: self.source.clone(),
            licence: self.licence.clone(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            classes: self.classes.clone(),
            attributes: self.attributes.clone(),
            items: self.items.clone(),
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| write_err(dir, e))?;
        write_atomic(&dir.join("dataset.json"), &json)?;
        write_atomic(&dir.join("LICENCE.txt"), self.licence.as_bytes())
    }

    /// Read a folder written by [`ImageTextDataset::save`].
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let manifest_path = dir.join("dataset.json");
        let images_path = dir.join("images.safetensors");
        for p in [&manifest_path, &images_path] {
            if !p.is_file() {
                return Err(DataError::Missing(p.display().to_string()));
            }
        }
        let text = std::fs::read(&manifest_path).map_err(|e| invalid(&manifest_path, e))?;
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| invalid(&manifest_path, format!("not a dataset manifest: {e}")))?;
        let bytes = std::fs::read(&images_path).map_err(|e| invalid(&images_path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| invalid(&images_path, format!("not safetensors: {e}")))?;
        let images = st
            .tensor("images")
            .map_err(|_| invalid(&images_path, "no tensor `images`"))?;
        let want = [m.items.len(), m.channels, m.height, m.width];
        if images.dtype() != Dtype::U8 || images.shape() != want {
            return Err(invalid(
                &images_path,
                format!(
                    "`images` is {:?} {:?}, expected U8 {want:?} (from dataset.json)",
                    images.dtype(),
                    images.shape()
                ),
            ));
        }
        if let Some(bad) = m.items.iter().position(|i| {
            i.captions.is_empty() || i.label.is_some_and(|l| l >= m.classes.len().max(1))
        }) {
            return Err(invalid(
                &manifest_path,
                format!("item {bad} has no captions or an unknown label"),
            ));
        }
        if !m.attributes.is_empty()
            && let Some(bad) = m
                .classes
                .iter()
                .find(|c| c.split(' ').count() != m.attributes.len())
        {
            return Err(invalid(
                &manifest_path,
                format!(
                    "class {bad:?} does not have one word per attribute {:?}",
                    m.attributes
                ),
            ));
        }
        Ok(Self {
            name: m.name,
            source: m.source,
            licence: m.licence,
            channels: m.channels,
            height: m.height,
            width: m.width,
            images: images.data().to_vec(),
            classes: m.classes,
            attributes: m.attributes,
            items: m.items,
        })
    }

    /// A deterministic split: every `k`-th image (from `offset`) and the rest.
    pub fn split_every(&self, k: usize, offset: usize) -> (Self, Self) {
        let (a, b): (Vec<usize>, Vec<usize>) = (0..self.len()).partition(|i| i % k == offset);
        (self.subset(&a), self.subset(&b))
    }
}

/// The folder of an extracted npm package (`…/package`), accepting the folder above it too.
pub fn package_dir(path: &Path, marker: &str) -> Result<PathBuf, DataError> {
    for cand in [path.to_path_buf(), path.join("package")] {
        if cand.join(marker).exists() {
            return Ok(cand);
        }
    }
    Err(DataError::Missing(format!(
        "{} (expected an extracted npm package containing {marker})",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TB, device, to_vec};

    #[test]
    fn a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("instaflow-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("busy/inner")).unwrap();
        write_atomic(&dir.join("a.json"), b"old").unwrap();
        write_atomic(&dir.join("a.json"), b"new").unwrap();
        assert_eq!(std::fs::read(dir.join("a.json")).unwrap(), b"new");
        // A non-empty folder under the target name: the rename fails.
        let err = write_atomic(&dir.join("busy"), b"x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("busy"), "{err}");
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tiny() -> ImageTextDataset {
        ImageTextDataset {
            name: "t".into(),
            source: "test".into(),
            licence: "none".into(),
            channels: 1,
            height: 1,
            width: 2,
            images: vec![0, 255, 51, 102],
            classes: vec!["a".into(), "b".into()],
            attributes: vec![],
            items: vec![
                Item {
                    label: Some(0),
                    captions: vec!["x".into()],
                },
                Item {
                    label: Some(1),
                    captions: vec!["y".into(), "x".into()],
                },
            ],
        }
    }

    #[test]
    fn save_load_round_trip_and_pixel_range() {
        let dir = std::env::temp_dir().join(format!("instaflow-data-{}", std::process::id()));
        let d = tiny();
        d.save(&dir).unwrap();
        let back = ImageTextDataset::load(&dir).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.all_captions(), vec!["x", "y"]);
        let px = to_vec(back.pixels::<TB>(&[0], &device()));
        assert_eq!(px, vec![-1.0, 1.0]);
        // A corrupt image file is a clear error.
        std::fs::write(dir.join("images.safetensors"), b"junk").unwrap();
        let err = ImageTextDataset::load(&dir).unwrap_err().to_string();
        assert!(err.contains("not safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn subset_and_split() {
        let d = tiny();
        let (a, b) = d.split_every(2, 1);
        assert_eq!(a.images, vec![51, 102]);
        assert_eq!(b.images, vec![0, 255]);
        assert_eq!(a.items[0].label, Some(1));
    }
}
