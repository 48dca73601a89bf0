//! The annotation tool in headless Chromium with a 24-megapixel photo (6000×4000 JPEG) and 500
//! saved shapes (boxes and polygons): time to first contentful paint, to interactive (the
//! picture decoded and every shape drawn: the tool's `annotator-ready` mark), and one full
//! redraw (what each pointer move costs while dragging). Baseline in the same run: the same
//! page with a 640×480 picture and no shapes; the ratios are the large task's cost.
//!
//! `cargo bench -p suanli-portal --bench annotation_page -- --runs 5`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::{json, Value};
use suanli_testkit::webdriver::Browser;
use support::{new_dataset, tar_of, token, Api, Backend, Tus, World, PASSWORD};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn jpeg(width: u32, height: u32) -> anyhow::Result<Vec<u8>> {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x / 7) as u8, (y / 5) as u8, ((x ^ y) & 0xff) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Jpeg)?;
    Ok(out.into_inner())
}

/// 500 shapes over a `width × height` picture: boxes and pentagons in a grid.
fn shapes(width: f64, height: f64) -> Value {
    let (cols, rows) = (25.0, 20.0);
    let (cw, ch) = (width / cols, height / rows);
    let mut out = Vec::new();
    for i in 0..500 {
        let (x, y) = ((i % 25) as f64 * cw, (i / 25) as f64 * ch);
        let id = format!("s{i}");
        if i % 2 == 0 {
            out.push(json!({"id": id, "label": "cat", "type": "box", "x": x + 2.0, "y": y + 2.0, "w": cw - 4.0, "h": ch - 4.0}));
        } else {
            let (cx, cy, r) = (x + cw / 2.0, y + ch / 2.0, cw.min(ch) / 2.5);
            let points: Vec<[f64; 2]> = (0..5)
                .map(|k| {
                    let a = k as f64 * std::f64::consts::TAU / 5.0;
                    [cx + r * a.cos(), cy + r * a.sin()]
                })
                .collect();
            out.push(json!({"id": id, "label": "dog", "type": "polygon", "points": points}));
        }
    }
    Value::Array(out)
}

struct Timing {
    paint_ms: Vec<f64>,
    ready_ms: Vec<f64>,
    redraw_ms: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

async fn measure(b: &Browser, url: &str, runs: u64) -> anyhow::Result<Timing> {
    let mut t = Timing { paint_ms: Vec::new(), ready_ms: Vec::new(), redraw_ms: Vec::new() };
    for _ in 0..runs {
        b.goto(url).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let ready = b.execute("return document.getElementById('annotator').dataset.ready === '1';", json!([])).await?;
            if ready == true {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the tool never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let v = b
            .execute(
                "const paint = performance.getEntriesByName('first-contentful-paint')[0];
                 const ready = performance.getEntriesByName('annotator-ready')[0];
                 return [paint ? paint.startTime : -1, ready ? ready.startTime : -1, window.suanliAnnotator.timeRedraws(5)];",
                json!([]),
            )
            .await?;
        t.paint_ms.push(v[0].as_f64().unwrap_or(f64::NAN));
        t.ready_ms.push(v[1].as_f64().unwrap_or(f64::NAN));
        t.redraw_ms.push(v[2].as_f64().unwrap_or(f64::NAN));
    }
    Ok(t)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs = arg("--runs", 5);
    let Some(w) = World::start(Backend::Sqlite).await? else { anyhow::bail!("no portal") };
    let owner = w.person("researcher", "olga").await?;
    let ann: Api = w.person("researcher", "ann").await?;
    let big = jpeg(6000, 4000)?;
    let small = jpeg(640, 480)?;
    println!("the large picture: 6000×4000 JPEG, {:.1} MiB", big.len() as f64 / (1 << 20) as f64);
    let d = new_dataset(&owner, "pictures").await?;
    let upload = Tus::new(&w, &token(&owner).await?).upload("pictures.tar", &tar_of(&[("a-big.jpg".into(), big), ("b-small.jpg".into(), small)])).await?;
    let (status, body) = owner.post(&format!("/api/v1/datasets/{d}/versions"), json!({"uploads": [upload], "labels": "none"})).await?;
    anyhow::ensure!(status.is_success(), "version: {status} {body}");
    let schema = json!({"classes": [{"name": "cat", "colour": "#e6194b"}, {"name": "dog", "colour": "#3cb44b"}], "kinds": ["box", "polygon"]});
    let (status, p) = owner.post("/api/v1/annotation-projects", json!({"name": "big", "dataset": d, "schema": schema, "task_size": 1, "overlap": 1})).await?;
    anyhow::ensure!(status.is_success(), "project: {status} {p}");
    let id = p["id"].as_u64().unwrap_or_default();
    let (status, body) = owner.send(reqwest::Method::PUT, &format!("/api/v1/annotation-projects/{id}/members/ann"), Some(json!({"role": "annotator"}))).await?;
    anyhow::ensure!(status.is_success(), "invite: {status} {body}");
    // Two tasks of one picture each; the large one gets the 500 shapes. Both are submitted (the
    // tool shows a submitted task read-only, drawn the same).
    let mut slots = Vec::new();
    for _ in 0..2 {
        let (status, slot) = ann.post(&format!("/api/v1/annotation-projects/{id}/next"), json!({})).await?;
        anyhow::ensure!(status.is_success(), "pull: {status} {slot}");
        if slot["images"][0]["width"] == 6000 {
            let path = format!("/api/v1/annotation-projects/{id}/tasks/{}/slots/{}/images/{}", slot["task"], slot["slot"], slot["images"][0]["position"]);
            let (status, body) = ann.send(reqwest::Method::PUT, &path, Some(json!({"shapes": shapes(6000.0, 4000.0), "revision": 0}))).await?;
            anyhow::ensure!(status.is_success(), "500 shapes: {status} {body}");
        }
        let (status, body) = ann.post(&format!("/api/v1/annotation-projects/{id}/tasks/{}/slots/{}/submit", slot["task"], slot["slot"]), json!({})).await?;
        anyhow::ensure!(status.is_success(), "submit: {status} {body}");
        slots.push(slot);
    }
    let large = slots.iter().find(|s| s["images"][0]["width"] == 6000).ok_or_else(|| anyhow::anyhow!("no large picture"))?;
    let small = slots.iter().find(|s| s["images"][0]["width"] == 640).ok_or_else(|| anyhow::anyhow!("no small picture"))?;
    let b = Browser::start().await?;
    b.goto(&format!("{}/login", w.portal.url)).await?;
    b.type_into("input[name=login]", "ann").await?;
    b.type_into("input[name=password]", PASSWORD).await?;
    b.click("form.api button[type=submit]").await?;
    b.wait_for("button[data-logout]", Duration::from_secs(30)).await?;
    let page = |s: &Value| format!("{}/annotation/{id}/tasks/{}/slots/{}", w.portal.url, s["task"], s["slot"]);
    let base = measure(&b, &page(small), runs).await?;
    let heavy = measure(&b, &page(large), runs).await?;
    println!("\n{runs} loads each, Chromium headless (median / max, ms from navigation start)");
    println!("| page | first paint | interactive | redraw |");
    println!("|---|---|---|---|");
    for (name, t) in [("baseline: 640×480, no shapes", &base), ("6000×4000, 500 shapes", &heavy)] {
        println!(
            "| {name} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} / {:.1} |",
            median(&t.paint_ms),
            max(&t.paint_ms),
            median(&t.ready_ms),
            max(&t.ready_ms),
            median(&t.redraw_ms),
            max(&t.redraw_ms)
        );
    }
    println!("ratio interactive large / baseline: {:.2}", median(&heavy.ready_ms) / median(&base.ready_ms));
    Ok(())
}
