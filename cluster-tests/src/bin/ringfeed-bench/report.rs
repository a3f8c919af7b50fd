//! Results: medians, the JSON files, the plots, the README table.

use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde_json::{json, Value};

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// The machine the figures were taken on.
pub(crate) fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let version = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    json!({
        "cores": cores,
        "kernel": kernel,
        "memory_bytes": std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
            line[9..].trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|k| k * 1024)
        }),
        "versions": {
            "ringfeed": env!("CARGO_PKG_VERSION"),
            "node": version("node", "--version"),
            "redis": version("redis-server", "--version"),
        },
    })
}

/// Writes `{dir}/{id}.json`.
pub(crate) fn write_json(dir: &Path, id: &str, value: &Value) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{id}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// `(percentile, latency in ms)` points of a latency CDF.
pub(crate) fn cdf(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    [
        0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
    ]
    .iter()
    .map(|&p| (p, h.value_at_percentile(p) as f64 / 1000.0))
    .collect()
}

pub(crate) fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": h.max() as f64 / 1000.0,
    })
}

/// One SVG: throughput over time on the left (when given), latency CDF on the right.
pub(crate) fn plot(
    path: &Path,
    title: &str,
    throughput: &[(String, Vec<(f64, f64)>)],
    latency: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 18))?;
    let panels: Vec<_> = if throughput.is_empty() {
        vec![root.clone()]
    } else {
        let (left, right) = root.split_horizontally(550);
        vec![left, right]
    };
    let colors = [
        RED,
        BLUE,
        GREEN,
        MAGENTA,
        CYAN,
        BLACK,
        RGBColor(255, 140, 0),
        RGBColor(128, 128, 128),
    ];
    if !throughput.is_empty() {
        let x_max = throughput
            .iter()
            .flat_map(|(_, s)| s.iter().map(|p| p.0))
            .fold(1.0, f64::max);
        let y_max = throughput
            .iter()
            .flat_map(|(_, s)| s.iter().map(|p| p.1))
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(&panels[0])
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .caption("delivered messages/s over time", ("sans-serif", 14))
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("msg/s")
            .draw()?;
        for (i, (name, series)) in throughput.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(
                    series.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    if !latency.is_empty() {
        let panel = panels.last().expect("a panel");
        let y_max = latency
            .iter()
            .flat_map(|(_, s)| s.iter().map(|p| p.1))
            .fold(0.001, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .caption("latency CDF (publish → frame received)", ("sans-serif", 14))
            .build_cartesian_2d(0.0..100.0, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("ms")
            .draw()?;
        for (i, (name, series)) in latency.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(
                    series.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The README's benchmark table, from every `P*.json` in `dir`, between the markers
/// `<!-- bench:begin -->` and `<!-- bench:end -->`.
pub(crate) fn readme_table(dir: &Path, readme: &Path) -> Result<()> {
    let mut rows = Vec::new();
    for id in [
        "P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P10", "P11",
    ] {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("{id}.json"))) else {
            rows.push(format!("| {id} | not measured yet | | | | |"));
            continue;
        };
        let mut v: Value = serde_json::from_str(&text)?;
        if id == "P6" {
            // Written by the router's ring_bench example, in its own shape.
            let r = v["ringfeed"].clone();
            v["what"] = json!("ring quality: 1M keys, 5 nodes × 1,024 points");
            v["summary_ringfeed"] = json!(format!(
                "max/mean {:.3}; {:.3} moved when a 6th joins; lookup {:.0} ns",
                r["max_over_mean"].as_f64().unwrap_or(f64::NAN),
                r["moved_share"].as_f64().unwrap_or(f64::NAN),
                r["lookup_ns"].as_f64().unwrap_or(f64::NAN)
            ));
            v["summary_peers"] = json!("—");
            v["summary_calibration"] = json!("—");
            v["bar"] = json!("max/mean ≤ 1.10, moved 1/6 ± 10%, lookup ≤ 100 ns");
        }
        let cell = |k: &str| v[k].as_str().unwrap_or("").to_owned();
        let met = match v["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "not met",
            None => "—",
        };
        rows.push(format!(
            "| {id} | {} | {} | {} | {} | {} ({met}) |",
            cell("what"),
            cell("summary_ringfeed"),
            cell("summary_peers"),
            cell("summary_calibration"),
            cell("bar"),
        ));
    }
    let table = format!(
        "| id | what | ringfeed | peers | calibration | bar |\n| --- | --- | --- | --- | --- | --- |\n{}\n",
        rows.join("\n")
    );
    let text = std::fs::read_to_string(readme)?;
    let (begin, end) = ("<!-- bench:begin -->", "<!-- bench:end -->");
    let (Some(a), Some(b)) = (text.find(begin), text.find(end)) else {
        anyhow::bail!("{} has no {begin} … {end} markers", readme.display());
    };
    let updated = format!("{}{begin}\n{table}{}", &text[..a], &text[b..]);
    std::fs::write(readme, updated)?;
    println!("updated the table in {}", readme.display());
    Ok(())
}
