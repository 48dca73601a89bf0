//! Line charts, as hand-written SVG and as PNG (tiny-skia and a bitmap font; no plotting
//! crate, no system font): the JCT CDF and the utilisation and queue-length timelines of
//! `suanli-sim trace`, the market's timeline, the federation's convergence.
//!
//! Every number is printed with fixed decimals and every pixel drawn the same way, so the
//! same data gives the same bytes.

use std::fmt::Write as _;

/// One line of a chart: `(x, y)` points in data units, drawn in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart: axes, ticks, a line per series and a legend.
#[derive(Clone, Debug)]
pub struct Panel<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Logarithmic x axis (base 10; points at x ≤ 0 are left out).
    pub x_log: bool,
    /// Fixed y range; otherwise 0 to the largest y.
    pub y_range: Option<(f64, f64)>,
    pub series: &'a [Series],
}

/// Line colours, one per series in order (repeating).
pub const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

const WIDTH: f64 = 860.0;
const PANEL_HEIGHT: f64 = 320.0;
const LEFT: f64 = 70.0;
/// Room right of the plotting area for the legend.
const RIGHT: f64 = 190.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 45.0;

/// Bucket means: at most `max` points, each the mean of consecutive points (x and y).
pub fn downsample(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max || max == 0 {
        return points.to_vec();
    }
    let per = points.len().div_ceil(max);
    points
        .chunks(per)
        .map(|c| {
            let n = c.len() as f64;
            (c.iter().map(|p| p.0).sum::<f64>() / n, c.iter().map(|p| p.1).sum::<f64>() / n)
        })
        .collect()
}

/// The empirical CDF of `values` as at most `max` points `(value, fraction ≤ value)`.
pub fn cdf(values: &[f64], max: usize) -> Vec<(f64, f64)> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return vec![];
    }
    let step = n.div_ceil(max.max(1)).max(1);
    let mut out: Vec<(f64, f64)> = (0..n).step_by(step).map(|i| (sorted[i], (i + 1) as f64 / n as f64)).collect();
    if out.last().is_some_and(|p| p.1 < 1.0) {
        out.push((sorted[n - 1], 1.0));
    }
    out
}

/// Tick positions: decades on a log axis, 4–8 round numbers on a linear one.
fn ticks(lo: f64, hi: f64, log: bool) -> Vec<f64> {
    if log {
        let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        return (a..=b).map(|e| 10f64.powi(e)).collect();
    }
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= 7.0).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

fn label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.0}e{}", v / 10f64.powi(a.log10().floor() as i32), a.log10().floor() as i32)
    } else if a >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Escapes text for an SVG text node or attribute.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Where a panel's data lands: its axes' ranges and the plotting area, shared by the SVG and
/// PNG renderings so both draw the same picture.
struct Frame {
    x_log: bool,
    x_lo: f64,
    x_hi: f64,
    y_lo: f64,
    y_hi: f64,
    /// Plotting area: x0..x1 left to right, y0 (bottom) to y1 (top).
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
    top: f64,
}

impl Frame {
    fn new(p: &Panel, top: f64) -> Frame {
        let keep = |x: f64| !p.x_log || x > 0.0;
        let xs = p.series.iter().flat_map(|s| s.points.iter()).map(|q| q.0).filter(|&x| keep(x));
        let (mut x_lo, mut x_hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
        if !x_lo.is_finite() {
            (x_lo, x_hi) = if p.x_log { (1.0, 10.0) } else { (0.0, 1.0) };
        }
        if p.x_log {
            (x_lo, x_hi) = (10f64.powf(x_lo.log10().floor()), 10f64.powf(x_hi.log10().ceil()));
        } else {
            // Linear axes start at 0 (time since the trace's start).
            x_lo = x_lo.min(0.0);
        }
        if x_hi <= x_lo {
            x_hi = if p.x_log { x_lo * 10.0 } else { x_lo + 1.0 };
        }
        let (y_lo, y_hi) = p.y_range.unwrap_or_else(|| {
            let max = p.series.iter().flat_map(|s| s.points.iter()).map(|q| q.1).fold(0.0, f64::max);
            let t = ticks(0.0, if max > 0.0 { max } else { 1.0 }, false);
            let step = if t.len() > 1 { t[1] - t[0] } else { 1.0 };
            (0.0, ((max / step).ceil() * step).max(step))
        });
        Frame { x_log: p.x_log, x_lo, x_hi, y_lo, y_hi, x0: LEFT, x1: WIDTH - RIGHT, y0: top + PANEL_HEIGHT - BOTTOM, y1: top + TOP, top }
    }

    fn sx(&self, x: f64) -> f64 {
        let f = if self.x_log { (x.log10() - self.x_lo.log10()) / (self.x_hi.log10() - self.x_lo.log10()) } else { (x - self.x_lo) / (self.x_hi - self.x_lo) };
        self.x0 + f * (self.x1 - self.x0)
    }

    fn sy(&self, y: f64) -> f64 {
        self.y0 - (y - self.y_lo) / (self.y_hi - self.y_lo) * (self.y0 - self.y1)
    }

    fn x_ticks(&self) -> Vec<f64> {
        ticks(self.x_lo, self.x_hi, self.x_log)
    }

    fn y_ticks(&self) -> Vec<f64> {
        ticks(self.y_lo, self.y_hi, false)
    }

    /// A series' points in picture coordinates (a log axis drops x ≤ 0; y is clamped to the axis).
    fn points(&self, s: &Series) -> Vec<(f64, f64)> {
        s.points.iter().filter(|q| !self.x_log || q.0 > 0.0).map(|&(x, y)| (self.sx(x), self.sy(y.clamp(self.y_lo, self.y_hi)))).collect()
    }

    /// The legend's row for series `i`: its y.
    fn legend_y(&self, i: usize) -> f64 {
        self.y1 + 8.0 + 16.0 * i as f64
    }
}

fn panel(out: &mut String, p: &Panel, top: f64) {
    let f = Frame::new(p, top);
    let (x0, x1, y0, y1) = (f.x0, f.x1, f.y0, f.y1);
    let _ = writeln!(out, "<g class=\"panel\">");
    let _ = writeln!(out, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>", (x0 + x1) / 2.0, f.top + 18.0, esc(p.title));
    for t in f.x_ticks() {
        let x = f.sx(t);
        let _ = writeln!(out, "<line x1=\"{x:.1}\" y1=\"{y1:.1}\" x2=\"{x:.1}\" y2=\"{y0:.1}\" stroke=\"#e0e0e0\"/>");
        let _ = writeln!(out, "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", y0 + 16.0, label(t));
    }
    for t in f.y_ticks() {
        let y = f.sy(t);
        let _ = writeln!(out, "<line x1=\"{x0:.1}\" y1=\"{y:.1}\" x2=\"{x1:.1}\" y2=\"{y:.1}\" stroke=\"#e0e0e0\"/>");
        let _ = writeln!(out, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", x0 - 6.0, y + 4.0, label(t));
    }
    let _ = writeln!(out, "<line x1=\"{x0:.1}\" y1=\"{y0:.1}\" x2=\"{x1:.1}\" y2=\"{y0:.1}\" stroke=\"black\"/>");
    let _ = writeln!(out, "<line x1=\"{x0:.1}\" y1=\"{y1:.1}\" x2=\"{x0:.1}\" y2=\"{y0:.1}\" stroke=\"black\"/>");
    let _ = writeln!(out, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", (x0 + x1) / 2.0, y0 + 34.0, esc(p.x_label));
    let ym = (y0 + y1) / 2.0;
    let _ = writeln!(out, "<text x=\"16\" y=\"{ym:.1}\" transform=\"rotate(-90 16 {ym:.1})\" text-anchor=\"middle\">{}</text>", esc(p.y_label));
    for (i, s) in p.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts: Vec<String> = f.points(s).iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(out, "<polyline class=\"series\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>", pts.join(" "));
        let ly = f.legend_y(i);
        let _ = writeln!(
            out,
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{colour}\" stroke-width=\"3\"/><text class=\"legend\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            x1 + 12.0,
            x1 + 32.0,
            x1 + 38.0,
            ly + 4.0,
            esc(&s.label)
        );
    }
    let _ = writeln!(out, "</g>");
}

/// The panels stacked top to bottom in one SVG document.
pub fn svg(panels: &[Panel]) -> String {
    let h = PANEL_HEIGHT * panels.len().max(1) as f64;
    let mut out = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    let _ = writeln!(out, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    for (i, p) in panels.iter().enumerate() {
        panel(&mut out, p, PANEL_HEIGHT * i as f64);
    }
    out + "</svg>\n"
}

/// Extra width of a PNG for its legend (8-unit glyphs: 28 characters fit).
const PNG_EXTRA_LEGEND: f64 = 90.0;

/// The same panels as [`svg`], drawn into a PNG at twice the size (lines anti-aliased by
/// tiny-skia, text in the public-domain 8×8 font of `font8x8`): no system font is read, so the
/// same data gives the same bytes on the same target (floating point and SIMD may differ
/// across architectures).
pub fn png(panels: &[Panel]) -> Vec<u8> {
    let height = PANEL_HEIGHT * panels.len().max(1) as f64;
    // The bitmap font is wider than the SVG's: more room right of the plot for the legend.
    let mut r = raster::Raster::new(WIDTH + PNG_EXTRA_LEGEND, height);
    for (i, p) in panels.iter().enumerate() {
        let f = Frame::new(p, PANEL_HEIGHT * i as f64);
        let (x0, x1, y0, y1) = (f.x0, f.x1, f.y0, f.y1);
        let grey = raster::rgb("#e0e0e0");
        let black = raster::rgb("#000000");
        r.text((x0 + x1) / 2.0, f.top + 18.0, raster::Anchor::Middle, true, p.title);
        for t in f.x_ticks() {
            let x = f.sx(t);
            r.line(&[(x, y1), (x, y0)], grey, 1.0);
            r.text(x, y0 + 16.0, raster::Anchor::Middle, false, &label(t));
        }
        for t in f.y_ticks() {
            let y = f.sy(t);
            r.line(&[(x0, y), (x1, y)], grey, 1.0);
            r.text(x0 - 6.0, y + 4.0, raster::Anchor::End, false, &label(t));
        }
        r.line(&[(x0, y0), (x1, y0)], black, 1.0);
        r.line(&[(x0, y1), (x0, y0)], black, 1.0);
        r.text((x0 + x1) / 2.0, y0 + 34.0, raster::Anchor::Middle, false, p.x_label);
        r.vertical_text(16.0, (y0 + y1) / 2.0, p.y_label);
        for (i, s) in p.series.iter().enumerate() {
            let colour = raster::rgb(COLOURS[i % COLOURS.len()]);
            r.line(&f.points(s), colour, 1.5);
            let ly = f.legend_y(i);
            r.line(&[(x1 + 12.0, ly), (x1 + 32.0, ly)], colour, 3.0);
            r.text(x1 + 38.0, ly + 4.0, raster::Anchor::Start, false, &s.label);
        }
    }
    r.encode()
}

/// Drawing into pixels: lines with tiny-skia, text from an 8×8 bitmap font.
mod raster {
    use tiny_skia::{Color, Paint, PathBuilder, Pixmap, Rect, Stroke, Transform};

    /// Pixels per picture unit.
    const SCALE: f32 = 2.0;
    /// A glyph is 8 × 8 font pixels; one font pixel is this many picture units.
    const GLYPH_UNIT: f64 = 1.0;
    const ADVANCE: f64 = 8.0 * GLYPH_UNIT;
    /// Rows of the glyph above the baseline.
    const ASCENT: f64 = 7.0 * GLYPH_UNIT;

    pub enum Anchor {
        Start,
        Middle,
        End,
    }

    /// `#rrggbb` as a colour (black for anything else).
    pub fn rgb(hex: &str) -> Color {
        let channel = |i: usize| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
        Color::from_rgba8(channel(1), channel(3), channel(5), 255)
    }

    pub struct Raster {
        pixmap: Pixmap,
    }

    impl Raster {
        pub fn new(width: f64, height: f64) -> Raster {
            let (w, h) = ((width as f32 * SCALE).ceil() as u32, (height as f32 * SCALE).ceil() as u32);
            let mut pixmap = Pixmap::new(w.max(1), h.max(1)).expect("a picture of positive size");
            pixmap.fill(Color::WHITE);
            Raster { pixmap }
        }

        /// A polyline through `points` (picture units).
        pub fn line(&mut self, points: &[(f64, f64)], colour: Color, width: f64) {
            let mut path = PathBuilder::new();
            for (i, (x, y)) in points.iter().enumerate() {
                let (x, y) = (*x as f32 * SCALE, *y as f32 * SCALE);
                if i == 0 {
                    path.move_to(x, y);
                } else {
                    path.line_to(x, y);
                }
            }
            if points.len() == 1 {
                let (x, y) = points[0];
                path.line_to(x as f32 * SCALE + 0.01, y as f32 * SCALE);
            }
            let Some(path) = path.finish() else { return };
            let mut paint = Paint::default();
            paint.set_color(colour);
            paint.anti_alias = true;
            let stroke = Stroke { width: width as f32 * SCALE, ..Stroke::default() };
            self.pixmap.stroke_path(&path, &paint, &stroke, Transform::identity(), None);
        }

        fn font_pixel(&mut self, x: f64, y: f64) {
            let mut paint = Paint::default();
            paint.set_color(Color::BLACK);
            let size = (GLYPH_UNIT as f32) * SCALE;
            if let Some(rect) = Rect::from_xywh(x as f32 * SCALE, y as f32 * SCALE, size, size) {
                self.pixmap.fill_rect(rect, &paint, Transform::identity(), None);
            }
        }

        fn glyph(c: char) -> [u8; 8] {
            use font8x8::UnicodeFonts;
            font8x8::BASIC_FONTS.get(c).or_else(|| font8x8::LATIN_FONTS.get(c)).unwrap_or_else(|| font8x8::BASIC_FONTS.get('?').unwrap_or([0; 8]))
        }

        /// Text on the baseline `y`, placed by `anchor` at `x`; bold draws it twice, one unit apart.
        pub fn text(&mut self, x: f64, y: f64, anchor: Anchor, bold: bool, text: &str) {
            let width = text.chars().count() as f64 * ADVANCE;
            let left = match anchor {
                Anchor::Start => x,
                Anchor::Middle => x - width / 2.0,
                Anchor::End => x - width,
            };
            for (i, c) in text.chars().enumerate() {
                for (row, bits) in Self::glyph(c).iter().enumerate() {
                    for col in 0..8 {
                        if bits & (1 << col) != 0 {
                            let (px, py) = (left + i as f64 * ADVANCE + col as f64 * GLYPH_UNIT, y - ASCENT + row as f64 * GLYPH_UNIT);
                            self.font_pixel(px, py);
                            if bold {
                                self.font_pixel(px + GLYPH_UNIT / 2.0, py);
                            }
                        }
                    }
                }
            }
        }

        /// Text turned a quarter left (reading upwards), centred on (x, y), its baseline at x.
        pub fn vertical_text(&mut self, x: f64, y: f64, text: &str) {
            let bottom = y + text.chars().count() as f64 * ADVANCE / 2.0;
            for (i, c) in text.chars().enumerate() {
                for (row, bits) in Self::glyph(c).iter().enumerate() {
                    for col in 0..8 {
                        if bits & (1 << col) != 0 {
                            let px = x - ASCENT + row as f64 * GLYPH_UNIT;
                            let py = bottom - i as f64 * ADVANCE - (col as f64 + 1.0) * GLYPH_UNIT;
                            self.font_pixel(px, py);
                        }
                    }
                }
            }
        }

        pub fn encode(&self) -> Vec<u8> {
            self.pixmap.encode_png().expect("PNG encoding into memory")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(label: &str, points: &[(f64, f64)]) -> Series {
        Series { label: label.into(), points: points.to_vec() }
    }

    #[test]
    fn structure_of_a_two_panel_chart() {
        let a = series("fifo", &[(10.0, 0.25), (100.0, 0.5), (5000.0, 1.0)]);
        let b = series("las <2q>", &[(0.0, 0.1), (20.0, 0.5), (300.0, 1.0)]);
        let both = [a, b];
        let log = Panel { title: "JCT CDF", x_label: "JCT (s)", y_label: "fraction", x_log: true, y_range: Some((0.0, 1.0)), series: &both };
        let lin = Panel { title: "queue", x_label: "h", y_label: "jobs", x_log: false, y_range: None, series: &both[..1] };
        let doc = svg(&[log, lin]);
        assert!(doc.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"860\" height=\"640\""));
        assert!(doc.ends_with("</svg>\n"));
        assert_eq!(doc.matches("<g class=\"panel\">").count(), 2);
        assert_eq!(doc.matches("<polyline class=\"series\"").count(), 3);
        assert_eq!(doc.matches("<text class=\"legend\"").count(), 3);
        // Legend text escaped; the log axis has decade ticks 10 … 10000 and drops x = 0.
        assert!(doc.contains(">las &lt;2q&gt;</text>"));
        for t in ["10", "100", "1000", "10000"] {
            assert!(doc.contains(&format!("text-anchor=\"middle\">{t}</text>")), "tick {t}");
        }
        let las_line = doc.lines().filter(|l| l.starts_with("<polyline")).nth(1).expect("second line");
        assert_eq!(las_line.matches(',').count(), 2, "{las_line}");
        // Every point inside the plotting area of its panel.
        for line in doc.lines().filter(|l| l.starts_with("<polyline")) {
            let pts = line.split("points=\"").nth(1).and_then(|r| r.split('"').next()).expect("points");
            for p in pts.split(' ') {
                let (x, y): (f64, f64) = p.split_once(',').map(|(x, y)| (x.parse().expect("x"), y.parse().expect("y"))).expect("pair");
                assert!((LEFT..=WIDTH - RIGHT).contains(&x) && (TOP..=2.0 * PANEL_HEIGHT).contains(&y), "{p}");
            }
        }
        // Same data, same bytes.
        let again = svg(&[
            Panel { title: "JCT CDF", x_label: "JCT (s)", y_label: "fraction", x_log: true, y_range: Some((0.0, 1.0)), series: &both },
            Panel { title: "queue", x_label: "h", y_label: "jobs", x_log: false, y_range: None, series: &both[..1] },
        ]);
        assert_eq!(doc, again);
    }

    #[test]
    fn png_draws_the_same_picture_the_same_way() {
        let a = series("fifo", &[(0.0, 0.0), (10.0, 4.0), (20.0, 1.0)]);
        fn panels(s: &[Series]) -> Panel<'_> {
            Panel { title: "queue", x_label: "h", y_label: "jobs", x_log: false, y_range: None, series: s }
        }
        let one = [a.clone()];
        let png = png(&[panels(&one)]);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width (with room for the legend) and height at twice the SVG's size.
        let be = |i: usize| u32::from_be_bytes([png[i], png[i + 1], png[i + 2], png[i + 3]]);
        assert_eq!((be(16), be(20)), (2 * (WIDTH + PNG_EXTRA_LEGEND) as u32, 2 * PANEL_HEIGHT as u32));
        assert_eq!(png, super::png(&[panels(&one)]), "same data, same bytes");
        let other = [series("fifo", &[(0.0, 0.0), (10.0, 2.0), (20.0, 1.0)])];
        assert_ne!(png, super::png(&[panels(&other)]), "another line, another picture");
    }

    #[test]
    fn cdf_and_downsampling() {
        assert_eq!(cdf(&[3.0, 1.0, 2.0, 4.0], 10), vec![(1.0, 0.25), (2.0, 0.5), (3.0, 0.75), (4.0, 1.0)]);
        assert_eq!(cdf(&[3.0, 1.0, 2.0, 4.0, 5.0], 2), vec![(1.0, 0.2), (4.0, 0.8), (5.0, 1.0)]);
        assert_eq!(downsample(&[(0.0, 0.0), (1.0, 2.0), (2.0, 4.0), (3.0, 6.0), (4.0, 8.0)], 3), vec![(0.5, 1.0), (2.5, 5.0), (4.0, 8.0)]);
        let labels: Vec<String> = ticks(0.0, 1.0, false).into_iter().map(label).collect();
        assert_eq!(labels, ["0", "0.20", "0.40", "0.60", "0.80", "1"]);
    }
}
