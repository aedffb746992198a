//! PNG figures of the toy experiment (plotters, with an embedded DejaVu font so no system fonts
//! are needed).

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result, anyhow};
use instaflow::toy::{LabelledPoints, ToyReport};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];
const RANGE: f32 = 5.0;

fn class_color(label: usize) -> RGBColor {
    PALETTE[label % PALETTE.len()]
}

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Only fails on a malformed font, and the font is a fixed embedded file.
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing figure: {e:?}")
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// A square scatter/line panel over [−RANGE, RANGE]².
fn panel<'a, 'b>(
    area: &'a Area<'b>,
    title: &str,
) -> Result<
    ChartContext<
        'a,
        BitMapBackend<'b>,
        Cartesian2d<plotters::coord::types::RangedCoordf32, plotters::coord::types::RangedCoordf32>,
    >,
> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(8)
        .x_label_area_size(24)
        .y_label_area_size(30)
        .build_cartesian_2d(-RANGE..RANGE, -RANGE..RANGE)
        .map_err(err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    Ok(chart)
}

fn scatter(area: &Area, title: &str, pts: &LabelledPoints) -> Result<()> {
    let mut chart = panel(area, title)?;
    chart
        .draw_series(
            pts.points
                .iter()
                .zip(&pts.labels)
                .map(|(p, &l)| Circle::new((p[0], p[1]), 2, class_color(l).mix(0.6).filled())),
        )
        .map_err(err)?;
    Ok(())
}

/// 1-RF vs 2-RF paths from the same noise: crossing vs straight.
pub fn trajectories(report: &ToyReport, path: &Path) -> Result<()> {
    fonts();
    let n = report.trajectories.len().max(1) as u32;
    let root = BitMapBackend::new(path, (520 * n, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    for (traj, area) in report
        .trajectories
        .iter()
        .zip(root.split_evenly((1, n as usize)))
    {
        let name = &traj.model;
        let stats = report.row(name).and_then(|r| r.paths);
        let title = match stats {
            Some(s) => format!("{name} paths (straightness {:.3})", s.straightness),
            None => format!("{name} paths"),
        };
        let mut chart = panel(&area, &title)?;
        for (poly, &label) in traj.paths.iter().zip(&traj.labels) {
            let color = class_color(label);
            chart
                .draw_series(LineSeries::new(
                    poly.iter().map(|p| (p[0], p[1])),
                    color.mix(0.7),
                ))
                .map_err(err)?;
            if let (Some(a), Some(b)) = (poly.first(), poly.last()) {
                chart
                    .draw_series([Circle::new((a[0], a[1]), 2, BLACK.filled())])
                    .map_err(err)?;
                chart
                    .draw_series([Circle::new((b[0], b[1]), 3, color.filled())])
                    .map_err(err)?;
            }
        }
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One-step samples of every model next to the true π1, coloured by the class asked for.
pub fn one_step_samples(report: &ToyReport, path: &Path) -> Result<()> {
    fonts();
    let panels = report.one_step.len() + 1;
    let root = BitMapBackend::new(path, (420 * panels as u32, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((1, panels));
    scatter(&areas[0], "target π1", &report.target)?;
    for ((name, pts), area) in report.one_step.iter().zip(&areas[1..]) {
        let acc = report
            .row(name)
            .map(|r| r.one_step_accuracy * 100.0)
            .unwrap_or(f64::NAN);
        scatter(area, &format!("{name}, 1 step ({acc:.0}% acc.)"), pts)?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Training loss of every stage of the toy run (log scale).
pub fn losses(report: &ToyReport, path: &Path) -> Result<()> {
    loss_curves(&report.losses, path)
}

/// Loss curves `(name, [(step, loss)])` on a log scale.
pub fn loss_curves(curves: &[(String, Vec<(usize, f64)>)], path: &Path) -> Result<()> {
    fonts();
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let max_step = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .max()
        .unwrap_or(1) as f64;
    let values = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo < hi {
        (lo * 0.8, hi * 1.2)
    } else {
        (1e-4, 1.0)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption("training loss", ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_step, (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 12))
        .x_desc("step")
        .draw()
        .map_err(err)?;
    for (i, (stage, curve)) in curves.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                curve.iter().map(|&(s, l)| (s as f64, l)),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(stage.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Copy the RGB image `img` (`size` pixels) `zoom`× enlarged (nearest) into the RGB buffer `buf`
/// of `width` pixels a row, its top-left corner at `(x0, y0)`.
fn blit(
    buf: &mut [u8],
    width: usize,
    (x0, y0): (usize, usize),
    img: &[u8],
    size: (usize, usize),
    zoom: usize,
) {
    for y in 0..size.0 * zoom {
        for x in 0..size.1 * zoom {
            let src = ((y / zoom) * size.1 + x / zoom) * 3;
            let dst = ((y0 + y) * width + x0 + x) * 3;
            buf[dst..dst + 3].copy_from_slice(&img[src..src + 3]);
        }
    }
}

/// A grid of RGB images (rows × columns, each `size`² pixels shown `zoom`× larger) with a label in
/// front of every row, written as PNG.
pub fn image_grid(
    rows: &[(String, Vec<Vec<u8>>)],
    size: (usize, usize),
    zoom: usize,
    path: &Path,
) -> Result<()> {
    fonts();
    let (h, w) = (size.0 * zoom, size.1 * zoom);
    let cols = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let label_w = 150;
    let gap = 2;
    let width = label_w + cols * (w + gap);
    let height = rows.len() * (h + gap) + gap;
    let mut buf = vec![255u8; width * height * 3];
    for (r, (_, images)) in rows.iter().enumerate() {
        for (c, img) in images.iter().enumerate() {
            let at = (label_w + c * (w + gap), gap + r * (h + gap));
            blit(&mut buf, width, at, img, size, zoom);
        }
    }
    {
        let root =
            BitMapBackend::with_buffer(&mut buf, (width as u32, height as u32)).into_drawing_area();
        for (r, (label, _)) in rows.iter().enumerate() {
            let y = (gap + r * (h + gap) + h / 2) as i32 - 8;
            root.draw(&Text::new(label.as_str(), (6, y), ("sans-serif", 16)))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    image::RgbImage::from_raw(width as u32, height as u32, buf)
        .context("grid buffer")?
        .save(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Labelled groups of RGB images laid out `columns` groups per row: each group is its label over
/// its images side by side (a prompt and its seeds), each image `size`² shown `zoom`× larger.
pub fn prompt_grid(
    groups: &[(String, Vec<Vec<u8>>)],
    size: (usize, usize),
    zoom: usize,
    columns: usize,
    path: &Path,
) -> Result<()> {
    fonts();
    let (h, w) = (size.0 * zoom, size.1 * zoom);
    let per = groups.iter().map(|g| g.1.len()).max().unwrap_or(0);
    let (gap, label_h, margin) = (2, 20, 12);
    let cell_w = per * (w + gap) + margin;
    let cell_h = label_h + h + margin;
    let columns = columns.clamp(1, groups.len().max(1));
    let rows = groups.len().div_ceil(columns);
    let (width, height) = (columns * cell_w + margin, rows * cell_h + margin);
    let mut buf = vec![255u8; width * height * 3];
    for (i, (_, images)) in groups.iter().enumerate() {
        let (x_cell, y_cell) = (
            margin + (i % columns) * cell_w,
            margin + (i / columns) * cell_h,
        );
        for (c, img) in images.iter().enumerate() {
            let at = (x_cell + c * (w + gap), y_cell + label_h);
            blit(&mut buf, width, at, img, size, zoom);
        }
    }
    {
        let root =
            BitMapBackend::with_buffer(&mut buf, (width as u32, height as u32)).into_drawing_area();
        for (i, (label, _)) in groups.iter().enumerate() {
            let (x, y) = (
                margin + (i % columns) * cell_w,
                margin + (i / columns) * cell_h,
            );
            root.draw(&Text::new(
                label.as_str(),
                (x as i32, y as i32),
                ("sans-serif", 15),
            ))
            .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    image::RgbImage::from_raw(width as u32, height as u32, buf)
        .context("grid buffer")?
        .save(path)
        .with_context(|| format!("writing {}", path.display()))
}
