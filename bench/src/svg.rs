//! Hand-written SVG charts: the HdrHistogram-style latency-by-percentile
//! chart (x = percentile on a log "1/(1-p)" axis) and throughput over time.
//! Pure string building; each series is a `<polyline>` carrying
//! `data-series="NAME"` so tools and tests can find it.

use std::fmt::Write;

/// One line on a chart: (x, y) points in data units.
pub struct Series {
    pub name: String,
    pub color: String,
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

pub const PALETTE: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

const W: f64 = 900.0;
const H: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A "nice" upper bound and tick step for a linear axis.
pub fn nice_axis(max: f64) -> (f64, f64) {
    if max <= 0.0 || !max.is_finite() {
        return (1.0, 0.2);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

struct Frame {
    x_max: f64,
    y_max: f64,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x / self.x_max).clamp(0.0, 1.0) * (W - LEFT - RIGHT)
    }
    fn py(&self, y: f64) -> f64 {
        H - BOTTOM - (y / self.y_max).clamp(0.0, 1.0) * (H - TOP - BOTTOM)
    }
}

fn header(out: &mut String, title: &str, x_label: &str, y_label: &str) {
    let _ = write!(
        out,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>
<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>
"#,
        (LEFT + W - RIGHT) / 2.0,
        esc(title),
        (LEFT + W - RIGHT) / 2.0,
        H - 16.0,
        esc(x_label),
        (TOP + H - BOTTOM) / 2.0,
        (TOP + H - BOTTOM) / 2.0,
        esc(y_label)
    );
}

fn y_grid(out: &mut String, f: &Frame, step: f64) {
    let mut y = 0.0;
    while y <= f.y_max + step * 0.01 {
        let py = f.py(y);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            fmt_tick(y)
        );
        y += step;
    }
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{:.1}", v).trim_end_matches(".0").to_string()
    } else {
        format!("{v:.3}").trim_end_matches('0').to_string()
    }
}

fn series_and_legend(out: &mut String, f: &Frame, series: &[Series]) {
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s.points.iter().map(|(x, y)| format!("{:.1},{:.1}", f.px(*x), f.py(*y))).collect();
        let dash = if s.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(
            out,
            r#"<polyline class="series" data-series="{}" fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
            esc(&s.name),
            s.color,
            pts.join(" ")
        );
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = W - RIGHT + 15.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 24.0,
            s.color,
            lx + 30.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    out.push_str("</svg>\n");
}

/// x for percentile `p` in [0, 1): log10(1 / (1 - p)).
pub fn percentile_x(p: f64) -> f64 {
    (1.0 / (1.0 - p.min(0.999_999_9))).log10()
}

/// Latency by percentile. Each series' points are (percentile in [0,1],
/// latency in ms).
pub fn latency_by_percentile(title: &str, series: &[Series]) -> String {
    let max_x_data = series
        .iter()
        .flat_map(|s| s.points.iter().map(|(p, _)| percentile_x(*p)))
        .fold(2.0f64, f64::max)
        .ceil()
        .min(7.0);
    let y_data = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0f64, f64::max);
    let (y_max, step) = nice_axis(y_data);
    let f = Frame { x_max: max_x_data, y_max };
    let mut out = String::new();
    header(&mut out, title, "percentile", "latency (ms)");
    y_grid(&mut out, &f, step);
    let labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%", "99.99999%"];
    for d in 0..=max_x_data as usize {
        let px = f.px(d as f64);
        let _ = writeln!(
            out,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{}" stroke="#ddd"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 18.0,
            labels.get(d).copied().unwrap_or("")
        );
    }
    let mapped: Vec<Series> = series
        .iter()
        .map(|s| Series {
            name: s.name.clone(),
            color: s.color.clone(),
            dashed: s.dashed,
            points: s.points.iter().map(|(p, y)| (percentile_x(*p), *y)).collect(),
        })
        .collect();
    series_and_legend(&mut out, &f, &mapped);
    out
}

/// Throughput over time: points are (seconds since start, MB/s).
pub fn throughput_over_time(title: &str, y_label: &str, series: &[Series]) -> String {
    let x_data = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).fold(1.0f64, f64::max);
    let y_data = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0f64, f64::max);
    let (x_max, x_step) = nice_axis(x_data);
    let (y_max, y_step) = nice_axis(y_data);
    let f = Frame { x_max, y_max };
    let mut out = String::new();
    header(&mut out, title, "time (s)", y_label);
    y_grid(&mut out, &f, y_step);
    let mut x = 0.0;
    while x <= x_max + x_step * 0.01 {
        let px = f.px(x);
        let _ =
            writeln!(out, r#"<text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"#, H - BOTTOM + 18.0, fmt_tick(x));
        x += x_step;
    }
    series_and_legend(&mut out, &f, series);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axes() {
        assert_eq!(nice_axis(9.3), (10.0, 2.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
        let (m, s) = nice_axis(1234.0);
        assert!(m >= 1234.0 && s > 0.0);
    }

    #[test]
    fn percentile_axis_is_log() {
        assert!((percentile_x(0.9) - 1.0).abs() < 1e-9);
        assert!((percentile_x(0.99) - 2.0).abs() < 1e-9);
        assert_eq!(percentile_x(0.0), 0.0);
    }

    #[test]
    fn escaping_keeps_xml_well_formed() {
        let s = latency_by_percentile(
            "a <b> & \"c\"",
            &[Series { name: "x&y".into(), color: "#000".into(), dashed: true, points: vec![(0.0, 1.0), (0.99, 2.0)] }],
        );
        let doc = roxmltree::Document::parse(&s).unwrap();
        assert!(doc.descendants().any(|n| n.attribute("data-series") == Some("x&y")));
    }
}
