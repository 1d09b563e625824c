//! Line plots in panels, as PNG (text drawn with a font file through ab_glyph: no fontconfig,
//! nothing downloaded) or SVG (by the file's extension). `capsnet bench scale` and
//! `capsnet plot` draw with it.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::{BenchError, Result};

/// Where Debian's fonts-dejavu-core puts the font the plots are labelled with.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One line of a panel.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// How a panel's x axis is drawn.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    Linear,
    /// x holds log2 of the value; labelled with the value (1, 2, 4, ...).
    Log2,
}

/// One chart: a title, axis names, its lines.
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub x_axis: XAxis,
    /// The y range; None: from the data.
    pub y_range: Option<(f64, f64)>,
    /// The legend at the upper right instead of the lower left.
    pub legend_upper_right: bool,
    pub series: Vec<Series>,
}

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

/// Draws `panels` in a grid of `cols` columns, each `size` pixels, to `path` (.svg: SVG, else
/// PNG), the text laid out with the font at `font`.
pub fn draw(
    path: &Path,
    font: &Path,
    panels: &[Panel],
    cols: usize,
    size: (u32, u32),
) -> Result<()> {
    let plot_err = |e: String| BenchError::Settings(format!("plotting {}: {e}", path.display()));
    let cols = cols.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(cols).max(1);
    let dims = (size.0 * cols as u32, size.1 * rows as u32);
    let svg = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    // Both backends lay text out with the font's metrics.
    use_font(font)?;
    if svg {
        let root = SVGBackend::new(path, dims).into_drawing_area();
        draw_on(&root, panels, (rows, cols)).map_err(plot_err)?;
        root.present().map_err(|e| plot_err(e.to_string()))
    } else {
        let root = BitMapBackend::new(path, dims).into_drawing_area();
        draw_on(&root, panels, (rows, cols)).map_err(plot_err)?;
        root.present().map_err(|e| plot_err(e.to_string()))
    }
}

/// Registers the font once per process (plotters keeps it for the process's life).
pub(crate) fn use_font(font: &Path) -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(font).map_err(|e| {
                format!(
                    "the plot's font {}: {e} (apt-get install fonts-dejavu-core)",
                    font.display()
                )
            })?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{} is not a font plotters can read", font.display()))
        })
        .clone()
        .map_err(BenchError::Settings)
}

fn draw_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[Panel],
    grid: (usize, usize),
) -> std::result::Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    for (area, panel) in root.split_evenly(grid).iter().zip(panels) {
        let pts = || panel.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
        if !(x0.is_finite() && x1.is_finite()) {
            (x0, x1) = (0.0, 1.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let (y0, y1) = panel.y_range.unwrap_or_else(|| {
            let (a, b) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.1), b.max(p.1))
            });
            if a.is_finite() && b.is_finite() && b > a {
                let pad = 0.05 * (b - a);
                (a - pad, b + pad)
            } else if a.is_finite() {
                let pad = 0.05 * a.abs().max(1e-3);
                (a - pad, a + pad)
            } else {
                (0.0, 1.0)
            }
        });
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|x| e(&x))?;
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(panel.x_desc.as_str())
            .y_desc(panel.y_desc.as_str())
            .label_style(("sans-serif", 13))
            .light_line_style(WHITE);
        let log2 = |x: &f64| format!("{:.0}", x.exp2());
        let plain = |x: &f64| number(*x);
        if panel.x_axis == XAxis::Log2 {
            mesh.x_label_formatter(&log2)
                .x_labels((x1 - x0).ceil() as usize + 1);
        } else {
            mesh.x_label_formatter(&plain);
        }
        mesh.draw().map_err(|x| e(&x))?;
        for (i, s) in panel.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            // Thick lines through steep segments draw spikes in the bitmap backend (their joins
            // are mitred): lines are one pixel wide, sparse series get markers.
            chart
                .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(1)))
                .map_err(|x| e(&x))?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            if s.points.len() <= 64 {
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(|x| e(&x))?;
            }
        }
        if panel.series.len() > 1 || panel.series.iter().any(|s| !s.label.is_empty()) {
            chart
                .configure_series_labels()
                .position(if panel.legend_upper_right {
                    SeriesLabelPosition::UpperRight
                } else {
                    SeriesLabelPosition::LowerLeft
                })
                .label_font(("sans-serif", 12))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|x| e(&x))?;
        }
    }
    Ok(())
}

/// A tick label: whole numbers without decimals, others with as few as read well.
fn number(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}
