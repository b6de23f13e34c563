//! `--chart out.png`: the latency distribution (as a percentile spectrum,
//! the usual way to read a tail) above deliveries per second over time.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context};
use hdrhistogram::Histogram;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::Report;

/// Fonts plotters can draw labels with; the first that exists is used.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = FONTS
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or("no TrueType font found (apt-get install fonts-dejavu-core)")?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path}: not a usable font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws the chart; `latency` is the live-delivery histogram in µs.
pub(crate) fn draw(path: &Path, report: &Report, latency: &Histogram<u64>) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(450);
    let title = format!(
        "herald-load {} — {}{} — {} connections",
        report.scenario,
        report.kind,
        report
            .label
            .as_ref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default(),
        report.connections
    );

    // Percentile spectrum: x = 1/(1-q) on a log axis, so 90%, 99%, 99.9%
    // are evenly spaced.
    let points: Vec<(f64, f64)> = if latency.is_empty() {
        Vec::new()
    } else {
        let mut v = Vec::new();
        let mut x: f64 = 1.0;
        while x <= 100_000.0 {
            let q = 1.0 - 1.0 / x;
            v.push((x, latency.value_at_quantile(q) as f64 / 1000.0));
            x *= 1.05;
        }
        v
    };
    let y_max = points.iter().map(|p| p.1).fold(0.001_f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("{title}: end-to-end latency by percentile"),
            ("sans-serif", 20),
        )
        .margin(15)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0_f64..100_000.0_f64).log_scale(), 0.0..y_max)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_label_formatter(&|x| {
            let q = format!("{:.3}", (1.0 - 1.0 / x) * 100.0);
            format!("{}%", q.trim_end_matches('0').trim_end_matches('.'))
        })
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?;

    // Deliveries per second from the start of publishing.
    let d = &report.delivery;
    let series: Vec<(f64, f64)> = d
        .per_second
        .iter()
        .enumerate()
        .map(|(s, n)| (s as f64, *n as f64))
        .collect();
    let x_max = (series.len().max(2) - 1) as f64;
    let y_max = series.iter().map(|p| p.1).fold(1.0_f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("deliveries per second", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since publishing started")
        .y_desc("deliveries/s")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(series, RED.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The `scale` chart: connections per node over time (from each node's
/// own gauge) above deliveries per second, on one time axis (seconds since
/// publishing started; the ramp is negative).
pub(crate) fn draw_scale(path: &Path, report: &crate::scale::ScaleReport) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(560);
    let nodes = report
        .series
        .iter()
        .map(|p| p.connections.len())
        .max()
        .unwrap_or(0);
    let x_min = report.series.first().map_or(0.0, |p| p.t_s).min(0.0);
    let x_max = report
        .series
        .last()
        .map_or(1.0, |p| p.t_s)
        .max(report.per_second.len() as f64)
        .max(x_min + 1.0);
    let y_max = report
        .series
        .iter()
        .flat_map(|p| p.connections.iter().flatten())
        .copied()
        .max()
        .unwrap_or(1) as f64
        * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!(
                "herald-load scale{}: connections per node ({} nodes)",
                report
                    .label
                    .as_ref()
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default(),
                nodes
            ),
            ("sans-serif", 22),
        )
        .margin(15)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x_min..x_max, 0.0..y_max.max(1.0))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since publishing started")
        .y_desc("connections")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for node in 0..nodes {
        let color = Palette99::pick(node).to_rgba();
        // A node that is down draws as a gap: one line per stretch it was up.
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for p in &report.series {
            match p.connections.get(node).copied().flatten() {
                Some(c) => runs.last_mut().expect("one run").push((p.t_s, c as f64)),
                None => {
                    if !runs.last().expect("one run").is_empty() {
                        runs.push(Vec::new());
                    }
                }
            }
        }
        let mut first = true;
        for run in runs.into_iter().filter(|r| !r.is_empty()) {
            let series = chart
                .draw_series(LineSeries::new(run, color.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?;
            if first {
                series.label(format!("node {node}")).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
                first = false;
            }
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;

    let series: Vec<(f64, f64)> = report
        .per_second
        .iter()
        .enumerate()
        .map(|(s, n)| (s as f64, *n as f64))
        .collect();
    let y_max = series.iter().map(|p| p.1).fold(1.0_f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("deliveries per second (all clients)", ("sans-serif", 22))
        .margin(15)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x_min..x_max, 0.0..y_max)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since publishing started")
        .y_desc("deliveries/s")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(series, RED.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
