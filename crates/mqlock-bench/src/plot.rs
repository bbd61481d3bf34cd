//! The latency CDF plot: one line per system, log-scaled time axis, PNG.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::stats::{Stats, micros};

/// The font family name the plot registers its font under.
const FAMILY: &str = "sans-serif";

/// The lines' colours (Tableau 10: distinct on white, none too pale).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Points drawn per line at most (every sample of a long run would make a heavy file).
const POINTS: usize = 600;

/// Draws the empirical CDF of each `(label, stats)` into a `width`×`height` PNG at `path`,
/// with the text in the TrueType font at `font` (plotters' ab_glyph backend has no fonts of
/// its own).
pub fn cdf(
    path: &Path,
    font: &Path,
    title: &str,
    series: &[(String, &Stats)],
    (width, height): (u32, u32),
) -> Result<()> {
    let bytes = std::fs::read(font).with_context(|| {
        format!(
            "reading the plot's font {} (Debian: fonts-dejavu-core; or pass --font)",
            font.display()
        )
    })?;
    // Registered fonts live as long as the process.
    plotters::style::register_font(
        FAMILY,
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{} is not a TrueType font", font.display()))?;

    let lo = series
        .iter()
        .map(|(_, s)| micros(s.sorted[0]))
        .fold(f64::INFINITY, f64::min);
    let hi = series
        .iter()
        .map(|(_, s)| micros(*s.sorted.last().unwrap()))
        .fold(0.0, f64::max);
    // Whole decades around the data.
    let (lo, hi) = (
        10f64.powf(lo.max(1.0).log10().floor()),
        10f64.powf(hi.max(10.0).log10().ceil()),
    );

    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("lock+unlock cycle latency (µs, log scale)")
        .y_desc("fraction of cycles ≤ x")
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()?;

    for (i, (label, stats)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let n = stats.n();
        let step = n.div_ceil(POINTS).max(1);
        // Every `step`-th sample, and the last, at its cumulative fraction.
        let points = (0..n)
            .step_by(step)
            .chain(std::iter::once(n - 1))
            .map(|k| (micros(stats.sorted[k]), (k + 1) as f64 / n as f64));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
