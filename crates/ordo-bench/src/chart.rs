//! The experiment's chart, in the manner of the paper's figures 6 and 7:
//! error rate against mean callback delay, the naive mode on the left, the
//! re-assembled mode on the right, same y axis, 95% confidence intervals as
//! error bars.
//!
//! Drawn with plotters' bitmap backend; text goes through `ab_glyph`, which
//! needs a TrueType font file and no system font library: `$ORDO_CHART_FONT`,
//! else DejaVu Sans (Debian's `fonts-dejavu-core`, installed by
//! `scripts/install-deps.sh`).

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use plotters::{
    prelude::*,
    style::{FontStyle, register_font},
};

use crate::experiment::Cell;

/// Where a sans-serif TrueType font is looked for, in order.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers the font once per process as `sans-serif`.
fn font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let mut candidates: Vec<PathBuf> =
                std::env::var_os("ORDO_CHART_FONT").map(PathBuf::from).into_iter().collect();
            candidates.extend(FONT_CANDIDATES.iter().map(PathBuf::from));
            let Some((path, bytes)) = candidates.iter().find_map(|p| std::fs::read(p).ok().map(|b| (p, b))) else {
                return Err(format!(
                    "no TrueType font found (tried $ORDO_CHART_FONT and {}); install fonts-dejavu-core",
                    FONT_CANDIDATES.join(", ")
                ));
            };
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{} is not a usable TrueType font", path.display()))
        })
        .clone()
}

/// Draws the chart into `path` (PNG). Returns why not, if it cannot.
pub fn error_rate_chart(cells: &[Cell], path: &Path) -> Result<(), String> {
    font()?;
    draw(cells, path).map_err(|e| format!("cannot draw {}: {e}", path.display()))
}

fn draw(cells: &[Cell], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (1280, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(48);
    title.draw(&Text::new(
        "Error rate of an ordered character stream vs. mean callback delay (Ordo, 2048 chars per run)",
        (20, 14),
        ("sans-serif", 22).into_font(),
    ))?;
    let max_delay = cells.iter().map(|c| c.mean_delay_ms).fold(0.0, f64::max);
    let top = cells.iter().map(|c| 100.0 * (c.error.mean + c.error.ci95_half_width)).fold(0.0, f64::max);
    // Same y axis on both panels, so that "no errors" looks like it.
    let y_max = if top <= 0.0 { 1.0 } else { (top * 1.15).ceil() };
    let panels = body.split_evenly((1, 2));
    let modes = [
        ("naive", "naive (UNORDERED) — cf. fig. 6", RED),
        ("re-assembled", "re-assembled (ORDERED) — cf. fig. 7", BLUE),
    ];
    for (panel, (mode, caption, color)) in panels.iter().zip(modes) {
        let of_mode: Vec<&Cell> = cells.iter().filter(|c| c.mode == mode).collect();
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..(max_delay + 2.0), 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("mean callback delay (ms, exponential)")
            .y_desc("error rate (%)")
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .draw()?;
        let points: Vec<(f64, f64)> = of_mode.iter().map(|c| (c.mean_delay_ms, 100.0 * c.error.mean)).collect();
        chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
        chart.draw_series(of_mode.iter().map(|c| {
            let mean = 100.0 * c.error.mean;
            let half = 100.0 * c.error.ci95_half_width;
            ErrorBar::new_vertical(
                c.mean_delay_ms,
                (mean - half).max(0.0),
                mean,
                mean + half,
                color.stroke_width(2),
                12,
            )
        }))?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, color.filled())))?;
        chart.draw_series(of_mode.iter().map(|c| {
            let label = format!("{:.2}% (n={})", 100.0 * c.error.mean, c.runs);
            Text::new(label, (c.mean_delay_ms + 0.25, 100.0 * c.error.mean + y_max * 0.03), ("sans-serif", 15))
        }))?;
    }
    root.present()?;
    Ok(())
}
