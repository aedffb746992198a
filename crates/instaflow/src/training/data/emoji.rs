//! Emoji-text: the Twemoji graphics of npm `emoji-datasource-twitter` (CC-BY 4.0) with captions from
//! their Unicode names, short names, subcategories and dominant colour ("red heart").

use std::path::Path;

use serde::Deserialize;

use super::mnist::downsample;
use super::{DataError, ImageTextDataset, Item, invalid, package_dir};

#[derive(Deserialize)]
struct Entry {
    name: Option<String>,
    image: String,
    short_names: Vec<String>,
    category: String,
    subcategory: String,
    #[serde(default)]
    has_img_twitter: bool,
}

/// A colour word for an RGB mean (HSV bins); `None` when the colour is not distinctive.
pub fn colour_name([r, g, b]: [f32; 3]) -> &'static str {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let (v, s) = (max, if max > 0.0 { (max - min) / max } else { 0.0 });
    if s < 0.25 {
        return if v > 0.8 {
            "white"
        } else if v < 0.3 {
            "black"
        } else {
            "grey"
        };
    }
    let d = max - min;
    let h = if max == r {
        60.0 * ((g - b) / d).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    match h {
        h if !(15.0..345.0).contains(&h) => {
            if v < 0.45 {
                "brown"
            } else {
                "red"
            }
        }
        h if h < 40.0 => {
            if v < 0.6 {
                "brown"
            } else {
                "orange"
            }
        }
        h if h < 70.0 => "yellow",
        h if h < 170.0 => "green",
        h if h < 260.0 => "blue",
        h if h < 290.0 => "purple",
        _ => "pink",
    }
}

/// RGBA 64×64 → RGB composited on white, plus the mean colour of the opaque pixels.
fn composite(rgba: &[u8]) -> (Vec<u8>, [f32; 3]) {
    let n = rgba.len() / 4;
    let mut planar = vec![0u8; 3 * n];
    let (mut sum, mut weight) = ([0f32; 3], 0f32);
    for (i, p) in rgba.chunks(4).enumerate() {
        let a = p[3] as f32 / 255.0;
        for c in 0..3 {
            let v = p[c] as f32 * a + 255.0 * (1.0 - a);
            planar[c * n + i] = v.round() as u8;
            sum[c] += p[c] as f32 / 255.0 * a;
        }
        weight += a;
    }
    let w = weight.max(1e-6);
    (planar, [sum[0] / w, sum[1] / w, sum[2] / w])
}

/// Captions of one emoji.
fn captions(e: &Entry, colour: &str) -> Vec<String> {
    let clean = |s: &str| s.replace(['_', '-'], " ").to_lowercase();
    let short = clean(&e.short_names[0]);
    let mut c = vec![
        short.clone(),
        format!("{colour} {short}"),
        format!("{short} emoji"),
        format!("an emoji of a {short}"),
    ];
    if let Some(name) = &e.name {
        c.push(name.to_lowercase());
    }
    c.extend(e.short_names[1..].iter().map(|s| clean(s)));
    c.push(format!("{} {}", colour, clean(&e.subcategory)));
    c.dedup();
    c
}

/// Read the extracted npm package at `path` (`emoji.json` + `img/twitter/64/*.png`) at `size`
/// (64, 32 or 16) pixels; labels are the emoji categories.
pub fn from_package(path: &Path, size: usize) -> Result<ImageTextDataset, DataError> {
    if ![16, 32, 64].contains(&size) {
        return Err(invalid(
            path,
            format!("emoji size must be 16, 32 or 64, not {size}"),
        ));
    }
    let dir = package_dir(path, "emoji.json")?;
    let list = dir.join("emoji.json");
    let text = std::fs::read(&list).map_err(|e| invalid(&list, e))?;
    let entries: Vec<Entry> = serde_json::from_slice(&text).map_err(|e| invalid(&list, e))?;
    let mut classes: Vec<String> = Vec::new();
    let (mut images, mut items) = (Vec::new(), Vec::new());
    for e in entries
        .iter()
        .filter(|e| e.has_img_twitter && !e.short_names.is_empty())
    {
        let file = dir.join("img/twitter/64").join(&e.image);
        if !file.is_file() {
            continue;
        }
        let img = image::open(&file)
            .map_err(|err| invalid(&file, err))?
            .to_rgba8();
        if img.dimensions() != (64, 64) {
            return Err(invalid(
                &file,
                format!("expected 64×64, found {:?}", img.dimensions()),
            ));
        }
        let (rgb, mean) = composite(img.as_raw());
        images.extend(downsample(&rgb, 3, 64, 64 / size));
        let label = match classes.iter().position(|c| *c == e.category) {
            Some(i) => i,
            None => {
                classes.push(e.category.clone());
                classes.len() - 1
            }
        };
        items.push(Item {
            label: Some(label),
            captions: captions(e, colour_name(mean)),
        });
    }
    if items.is_empty() {
        return Err(invalid(&list, "no emoji with a Twitter image found"));
    }
    Ok(ImageTextDataset {
        name: "emoji".into(),
        source: "npm emoji-datasource-twitter@16.0.0 (emoji.json, img/twitter/64)".into(),
        licence:
            "Emoji graphics: Twemoji, (c) Twitter, Inc and other contributors, licensed under \
                  CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/); resized and composited \
                  on white. Metadata: emoji-datasource (MIT, (c) 2013 Cal Henderson)."
                .into(),
        channels: 3,
        height: size,
        width: size,
        images,
        classes,
        attributes: vec![],
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_names() {
        assert_eq!(colour_name([0.87, 0.18, 0.27]), "red");
        assert_eq!(colour_name([1.0, 0.8, 0.3]), "yellow");
        assert_eq!(colour_name([0.3, 0.5, 0.9]), "blue");
        assert_eq!(colour_name([0.95, 0.95, 0.95]), "white");
        assert_eq!(colour_name([0.5, 0.3, 0.1]), "brown");
    }

    #[test]
    fn captions_include_colour_and_names() {
        let e = Entry {
            name: Some("HEAVY BLACK HEART".into()),
            image: "x.png".into(),
            short_names: vec!["heart".into()],
            category: "Smileys & Emotion".into(),
            subcategory: "heart".into(),
            has_img_twitter: true,
        };
        let c = captions(&e, "red");
        assert!(c.contains(&"red heart".to_string()), "{c:?}");
        assert!(c.contains(&"heavy black heart".to_string()), "{c:?}");
    }

    #[test]
    fn composite_on_white() {
        // one transparent pixel, one opaque red pixel
        let (rgb, mean) = composite(&[0, 0, 0, 0, 255, 0, 0, 255]);
        assert_eq!(rgb, vec![255, 255, 255, 0, 255, 0]);
        assert_eq!(mean, [1.0, 0.0, 0.0]);
    }
}
