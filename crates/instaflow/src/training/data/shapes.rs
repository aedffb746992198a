//! Shapes-text: coloured shapes drawn by the project (so any amount, any size, no licence), each
//! with captions of its colour, shape, size and position ("a red heart", "a small blue star on
//! the left"). Every image has one class, `"{colour} {shape}"`, whose two words are the data set's
//! attributes (`colour`, `shape`) — what `eval` measures a model's prompt-following by.
//!
//! Drawn with tiny-skia (anti-aliased paths) rather than by hand: edges must be smooth at 32×32.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tiny_skia::{FillRule, Paint, PathBuilder, Pixmap, Transform};

use super::{DataError, ImageTextDataset, Item};

/// The shapes, in class order.
pub const SHAPES: [&str; 8] = [
    "circle", "square", "triangle", "star", "heart", "diamond", "cross", "moon",
];

/// The colours with their base RGB, in class order. Drawn colours vary around these by ±20 per
/// channel, which keeps every pair apart.
pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("orange", [245, 130, 20]),
    ("yellow", [240, 205, 20]),
    ("green", [40, 165, 60]),
    ("blue", [30, 80, 220]),
    ("purple", [130, 50, 180]),
    ("pink", [240, 110, 180]),
    ("black", [25, 25, 25]),
];

/// The data set's attributes: the words of each class name, in order.
pub const ATTRIBUTES: [&str; 2] = ["colour", "shape"];

/// One drawn image's parameters, in units of the image side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Drawing {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// RGB actually drawn.
    pub rgb: [u8; 3],
    /// Radius of the shape's bounding circle (0.22–0.42).
    pub radius: f32,
    /// Centre, x and y in [0, 1] (y downwards).
    pub centre: [f32; 2],
    /// Rotation in degrees (small: shapes keep their usual orientation).
    pub rotation: f32,
}

impl Drawing {
    /// A random drawing of `shape` in `colour`.
    pub fn random(shape: usize, colour: usize, rng: &mut impl Rng) -> Self {
        let base = COLOURS[colour].1;
        let rgb = base.map(|c| (c as i32 + rng.random_range(-20..=20)).clamp(0, 255) as u8);
        let radius = rng.random_range(0.22..0.42);
        // Fully inside, with a pixel's margin at 32×32.
        let lo = radius + 0.03;
        let centre = [
            rng.random_range(lo..1.0 - lo),
            rng.random_range(lo..1.0 - lo),
        ];
        Self {
            shape,
            colour,
            rgb,
            radius,
            centre,
            rotation: rng.random_range(-12.0..12.0),
        }
    }

    /// `"{colour} {shape}"`: the class name.
    pub fn class_name(&self) -> String {
        format!("{} {}", COLOURS[self.colour].0, SHAPES[self.shape])
    }

    /// Captions: colour and shape always, with size and position words where they are clear.
    pub fn captions(&self) -> Vec<String> {
        let (colour, shape) = (COLOURS[self.colour].0, SHAPES[self.shape]);
        let size = if self.radius < 0.29 {
            Some("small")
        } else if self.radius > 0.35 {
            Some("big")
        } else {
            None
        };
        let [x, y] = self.centre.map(|v| v - 0.5);
        let position = if x.abs() < 0.08 && y.abs() < 0.08 {
            Some("in the middle")
        } else if x.abs() > y.abs() + 0.04 {
            Some(if x < 0.0 {
                "on the left"
            } else {
                "on the right"
            })
        } else if y.abs() > x.abs() + 0.04 {
            Some(if y < 0.0 {
                "at the top"
            } else {
                "at the bottom"
            })
        } else {
            None
        };
        let article = if matches!(colour.as_bytes()[0], b'o') {
            "an"
        } else {
            "a"
        };
        let mut captions = vec![
            format!("{colour} {shape}"),
            format!("{article} {colour} {shape}"),
            format!("a {shape}"),
        ];
        if let Some(size) = size {
            captions.push(format!("a {size} {colour} {shape}"));
        }
        if let Some(position) = position {
            captions.push(format!("{article} {colour} {shape} {position}"));
        }
        captions
    }

    /// Draw on white: `size`² RGB pixels, planar (`[3, size, size]`).
    pub fn render(&self, size: usize) -> Vec<u8> {
        let side = size as f32;
        let mut pixmap = Pixmap::new(size as u32, size as u32).expect("size > 0");
        pixmap.fill(tiny_skia::Color::WHITE);
        let transform = Transform::from_row(1.0, 0.0, 0.0, 1.0, 0.0, 0.0)
            .pre_translate(self.centre[0] * side, self.centre[1] * side)
            .pre_scale(self.radius * side, self.radius * side)
            .pre_rotate(self.rotation);
        let mut paint = Paint {
            anti_alias: true,
            ..Paint::default()
        };
        let [r, g, b] = self.rgb;
        paint.set_color_rgba8(r, g, b, 255);
        let outline = unit_path(self.shape);
        pixmap.fill_path(&outline, &paint, FillRule::Winding, transform, None);
        if SHAPES[self.shape] == "moon" {
            // A crescent: the disc with an offset disc cut out in the background colour.
            let bite = PathBuilder::from_circle(0.45, -0.3, 0.85).expect("circle");
            paint.set_color_rgba8(255, 255, 255, 255);
            pixmap.fill_path(&bite, &paint, FillRule::Winding, transform, None);
        }
        let n = size * size;
        let mut planar = vec![0u8; 3 * n];
        // Opaque everywhere, so the premultiplied RGBA is plain RGB.
        for (i, p) in pixmap.data().chunks_exact(4).enumerate() {
            for c in 0..3 {
                planar[c * n + i] = p[c];
            }
        }
        planar
    }
}

/// The outline of `shape` inside the unit circle, centred on the origin, y downwards.
fn unit_path(shape: usize) -> tiny_skia::Path {
    let polygon = |points: &[(f32, f32)]| {
        let mut pb = PathBuilder::new();
        pb.move_to(points[0].0, points[0].1);
        for &(x, y) in &points[1..] {
            pb.line_to(x, y);
        }
        pb.close();
        pb.finish().expect("polygon")
    };
    let polar = |r: f32, deg: f32| {
        let a = (deg - 90.0).to_radians();
        (r * a.cos(), r * a.sin())
    };
    match SHAPES[shape] {
        "circle" | "moon" => PathBuilder::from_circle(0.0, 0.0, 1.0).expect("circle"),
        "square" => polygon(&[(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]),
        // Apex up; the centroid a little below the origin so the triangle fills the circle.
        "triangle" => polygon(&[(0.0, -0.95), (0.95, 0.7), (-0.95, 0.7)]),
        "star" => polygon(
            &(0..10)
                .map(|i| polar(if i % 2 == 0 { 1.0 } else { 0.42 }, 36.0 * i as f32))
                .collect::<Vec<_>>(),
        ),
        "heart" => {
            // The classic parametric heart (x = 16 sin³t, y = 13 cos t − 5 cos 2t − …), scaled.
            let points: Vec<(f32, f32)> = (0..64)
                .map(|i| {
                    let t = i as f32 / 64.0 * std::f32::consts::TAU;
                    let x = 16.0 * t.sin().powi(3);
                    let y = 13.0 * t.cos()
                        - 5.0 * (2.0 * t).cos()
                        - 2.0 * (3.0 * t).cos()
                        - (4.0 * t).cos();
                    (x / 16.5, -(y + 2.5) / 16.5)
                })
                .collect();
            polygon(&points)
        }
        "diamond" => polygon(&[(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)]),
        "cross" => {
            let (a, w) = (0.85, 0.3);
            polygon(&[
                (-w, -a),
                (w, -a),
                (w, -w),
                (a, -w),
                (a, w),
                (w, w),
                (w, a),
                (-w, a),
                (-w, w),
                (-a, w),
                (-a, -w),
                (-w, -w),
            ])
        }
        other => unreachable!("no outline for {other}"),
    }
}

/// The published prompt list of a model trained on this data: 48 `(prompt, class)` pairs, every
/// shape in 6 colours and every colour on 6 shapes ("a red circle", "an orange square", …).
pub fn example_prompts() -> Vec<(String, String)> {
    let mut list = Vec::new();
    for shift in 0..6 {
        for (s, shape) in SHAPES.iter().enumerate() {
            let colour = COLOURS[(s + shift) % COLOURS.len()].0;
            let article = if colour.starts_with('o') { "an" } else { "a" };
            list.push((
                format!("{article} {colour} {shape}"),
                format!("{colour} {shape}"),
            ));
        }
    }
    list
}

/// `per_class` drawings of every colour × shape at `size`², in a fixed order from `seed`.
pub fn generate(size: usize, per_class: usize, seed: u64) -> Result<ImageTextDataset, DataError> {
    if !(8..=256).contains(&size) {
        return Err(DataError::Invalid {
            path: "shapes".into(),
            message: format!("image size {size}: expected 8 to 256 pixels"),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let classes: Vec<String> = COLOURS
        .iter()
        .flat_map(|(c, _)| SHAPES.iter().map(move |s| format!("{c} {s}")))
        .collect();
    let mut images = Vec::with_capacity(classes.len() * per_class * 3 * size * size);
    let mut items = Vec::with_capacity(classes.len() * per_class);
    // Interleaved classes: any prefix or every-k-th subset stays balanced.
    for _ in 0..per_class {
        for colour in 0..COLOURS.len() {
            for shape in 0..SHAPES.len() {
                let d = Drawing::random(shape, colour, &mut rng);
                images.extend(d.render(size));
                items.push(Item {
                    label: Some(colour * SHAPES.len() + shape),
                    captions: d.captions(),
                });
            }
        }
    }
    Ok(ImageTextDataset {
        name: "shapes".into(),
        source: format!("drawn by instaflow (shapes, seed {seed})"),
        licence: "Drawn by the instaflow project; no third-party content.".into(),
        channels: 3,
        height: size,
        width: size,
        images,
        classes,
        attributes: ATTRIBUTES.map(String::from).to_vec(),
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_colour_then_shape_and_balanced() {
        let ds = generate(16, 2, 0).unwrap();
        assert_eq!(ds.classes.len(), 64);
        assert_eq!(ds.classes[0], "red circle");
        assert_eq!(ds.classes[4 * 8 + 4], "blue heart");
        assert_eq!(ds.len(), 128);
        assert_eq!(ds.images.len(), 128 * 3 * 16 * 16);
        for (i, item) in ds.items.iter().enumerate() {
            assert_eq!(item.label, Some(i % 64));
            assert!(item.captions.contains(&ds.classes[i % 64]));
        }
        // Same seed, same pixels.
        assert_eq!(generate(16, 2, 0).unwrap().images, ds.images);
        assert!(generate(4, 1, 0).is_err());
    }

    #[test]
    fn example_prompts_are_balanced_and_distinct() {
        let list = example_prompts();
        assert_eq!(list.len(), 48);
        assert_eq!(list[0], ("a red circle".into(), "red circle".into()));
        let distinct: std::collections::BTreeSet<_> = list.iter().map(|e| &e.1).collect();
        assert_eq!(distinct.len(), 48);
        for word in SHAPES.iter().chain(COLOURS.iter().map(|c| &c.0)) {
            let n = list
                .iter()
                .filter(|e| e.1.split(' ').any(|w| w == *word))
                .count();
            assert_eq!(n, 6, "{word}");
        }
    }

    #[test]
    fn drawn_pixels_have_the_named_colour_and_the_shape_its_area() {
        let area = |shape: usize| {
            let d = Drawing {
                shape,
                colour: 4,
                rgb: [0, 0, 255],
                radius: 0.4,
                centre: [0.5, 0.5],
                rotation: 0.0,
            };
            let px = d.render(64);
            let n = 64 * 64;
            // Blue pixels (not white): red channel dark.
            (0..n).filter(|&i| px[i] < 128).count() as f32 / n as f32
        };
        let circle = area(0);
        // π·0.4² ≈ 0.503 of the image.
        assert!((circle - 0.503).abs() < 0.02, "circle covers {circle}");
        let square = area(1);
        assert!((square - 0.36).abs() < 0.02, "square covers {square}");
        // A star and a moon cover much less than their circle; every shape covers something.
        for (shape, name) in SHAPES.iter().enumerate() {
            let a = area(shape);
            assert!(a > 0.1 && a <= circle + 0.01, "{name} covers {a}");
        }
        assert!(area(3) < 0.6 * circle && area(7) < 0.6 * circle);
    }

    #[test]
    fn captions_name_size_and_position_when_clear() {
        let d = Drawing {
            shape: 4,
            colour: 1,
            rgb: [245, 130, 20],
            radius: 0.25,
            centre: [0.3, 0.5],
            rotation: 0.0,
        };
        let c = d.captions();
        assert!(c.contains(&"orange heart".to_string()), "{c:?}");
        assert!(c.contains(&"an orange heart".to_string()), "{c:?}");
        assert!(c.contains(&"a small orange heart".to_string()), "{c:?}");
        assert!(
            c.contains(&"an orange heart on the left".to_string()),
            "{c:?}"
        );
        assert!(c.contains(&"a heart".to_string()), "{c:?}");
    }
}
