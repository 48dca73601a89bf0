//! The annotation tool in headless Chromium on real photos (the CV test data's cat and coffee
//! cup): three annotators each take the one task (three-way overlap) from the project page and
//! draw with mouse and keyboard — a box and a polygon on the cat, a box on the cup; one undoes
//! and redoes; one closes the tab right after drawing and finds the work saved when they come
//! back; one draws an extra box, which is the one conflict; the reviewer accepts it in the page;
//! the COCO export opens in pycocotools and holds exactly what was drawn, to the pixel (the
//! polygon rasterized by pycocotools itself). Each also paints a mask with the brush, and one
//! erases part of theirs: the masks saved and exported are the pixels whose centres lie within the
//! brush's radius of the pointer's path, pixel for pixel, as pycocotools decodes them.
//! Needs SUANLI_CV_DATA and SUANLI_TORCH_VENV (with pycocotools; `.ci/run` sets both).
//! Screenshots are saved under `target/tmp/portal-screenshots/`.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use suanli_testkit::webdriver::{key, Browser};
use support::{browser_login, new_dataset, screenshots, tar_of, token, Api, Backend, Tus, World};

const WAIT: Duration = Duration::from_secs(30);
const CAT_BOX: (f64, f64, f64, f64) = (100.0, 60.0, 200.0, 180.0);
const EAR: [(f64, f64); 4] = [(150.0, 70.0), (190.0, 62.0), (200.0, 110.0), (160.0, 118.0)];
const CUP_BOX: (f64, f64, f64, f64) = (200.0, 100.0, 200.0, 200.0);
const EXTRA_BOX: (f64, f64, f64, f64) = (20.0, 20.0, 60.0, 60.0);
/// A brush stroke on the cat's image (an L, so that the expected pixels are exact in floating
/// point), and an eraser stroke across it; the tool's brush starts at a radius of 10 pixels.
const STROKE: [(f64, f64); 3] = [(260.0, 200.0), (320.0, 200.0), (320.0, 250.0)];
const ERASE: [(f64, f64); 2] = [(290.0, 185.0), (290.0, 215.0)];
const BRUSH: f64 = 10.0;
const CAT_SIZE: (u32, u32) = (451, 300);

fn need(var: &str) -> Option<PathBuf> {
    let value = std::env::var_os(var).map(PathBuf::from);
    assert!(value.is_some() || std::env::var("CI").as_deref() != Ok("true"), "{var} must be set under CI=true");
    value
}

/// Where image point `(x, y)` is in the viewport, as the tool shows it now.
async fn at(b: &Browser, x: f64, y: f64) -> anyhow::Result<(f64, f64)> {
    let v = b.execute("return window.suanliAnnotator.toViewport(arguments[0], arguments[1]);", json!([x, y])).await?;
    Ok((v[0].as_f64().unwrap_or_default(), v[1].as_f64().unwrap_or_default()))
}

async fn draw_box(b: &Browser, (x, y, w, h): (f64, f64, f64, f64)) -> anyhow::Result<()> {
    b.keys("b").await?;
    let (from, mid, to) = (at(b, x, y).await?, at(b, x + w / 2.0, y + h / 2.0).await?, at(b, x + w, y + h).await?);
    b.mouse_path(&[from, mid, to]).await
}

async fn draw_polygon(b: &Browser, points: &[(f64, f64)]) -> anyhow::Result<()> {
    b.keys("p").await?;
    for &(x, y) in points {
        b.mouse_path(&[at(b, x, y).await?]).await?;
    }
    b.keys(&key::ENTER.to_string()).await
}

/// A stroke of the brush (`m`) or the eraser (`e`) along `points`.
async fn paint(b: &Browser, tool: &str, points: &[(f64, f64)]) -> anyhow::Result<()> {
    b.keys(tool).await?;
    let mut path = Vec::new();
    for &(x, y) in points {
        path.push(at(b, x, y).await?);
    }
    b.mouse_path(&path).await
}

/// The pixels strokes paint (row-major, `true` = set), by the tool's rule: a pixel whose centre
/// lies within the radius of a stroke's path; an eraser stroke clears them.
fn painted((width, height): (u32, u32), strokes: &[(&[(f64, f64)], bool)]) -> Vec<bool> {
    let mut pixels = vec![false; (width * height) as usize];
    for (points, erase) in strokes {
        for (i, &(bx, by)) in points.iter().enumerate() {
            let (ax, ay) = points[i.saturating_sub(1)];
            let (dx, dy) = (bx - ax, by - ay);
            let len2 = dx * dx + dy * dy;
            for y in 0..height {
                for x in 0..width {
                    let (px, py) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
                    let t = if len2 > 0.0 { (((px - ax) * dx + (py - ay) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
                    let (ex, ey) = (px - (ax + t * dx), py - (ay + t * dy));
                    if ex * ex + ey * ey <= BRUSH * BRUSH {
                        pixels[(y * width + x) as usize] = !erase;
                    }
                }
            }
        }
    }
    pixels
}

async fn attribute(b: &Browser, name: &str) -> anyhow::Result<String> {
    Ok(b.execute("return document.getElementById('annotator').dataset[arguments[0]] || '';", json!([name])).await?.as_str().unwrap_or_default().to_owned())
}

async fn wait_attribute(b: &Browser, name: &str, want: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = attribute(b, name).await?;
        if now == want {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "#annotator data-{name} is {now:?}, waiting for {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn save_state(b: &Browser) -> anyhow::Result<String> {
    Ok(b.execute("return document.querySelector('#annotator .save-state').dataset.state;", json!([])).await?.as_str().unwrap_or_default().to_owned())
}

/// Opens the tool on the annotator's task from the project page.
async fn open_task(b: &Browser, url: &str, project: u64, first_time: bool) -> anyhow::Result<()> {
    b.goto(&format!("{url}/annotation/{project}")).await?;
    if first_time {
        b.wait_for("button[data-next-task]", WAIT).await?;
        b.click("button[data-next-task]").await?;
    } else {
        b.wait_for(".my-tasks a[href*='/tasks/']", WAIT).await?;
        b.click(".my-tasks a[href*='/tasks/']").await?;
    }
    b.wait_url("/tasks/", WAIT).await?;
    wait_attribute(b, "ready", "1").await
}

/// One annotator's session. `close_mid_task`: closes the tab right after the cat is drawn and
/// comes back. `extra`: draws the extra box on the cup's image. `undo`: draws a stray box and
/// undoes, redoes and undoes it again with the keyboard.
async fn annotate(url: &str, project: u64, who: &str, close_mid_task: bool, extra: bool, undo: bool) -> anyhow::Result<()> {
    let b = Browser::start().await?;
    let result = async {
        browser_login(&b, url, who).await?;
        open_task(&b, url, project, true).await?;
        b.keys("1").await?;
        draw_box(&b, CAT_BOX).await?;
        draw_polygon(&b, &EAR).await?;
        wait_attribute(&b, "shapes", "2").await?;
        paint(&b, "m", &STROKE).await?;
        wait_attribute(&b, "shapes", "3").await?;
        if undo {
            draw_box(&b, (10.0, 10.0, 30.0, 30.0)).await?;
            wait_attribute(&b, "shapes", "4").await?;
            b.chord(&[key::CONTROL], 'z').await?;
            wait_attribute(&b, "shapes", "3").await?;
            b.chord(&[key::CONTROL, key::SHIFT], 'z').await?;
            wait_attribute(&b, "shapes", "4").await?;
            b.chord(&[key::CONTROL], 'z').await?;
            wait_attribute(&b, "shapes", "3").await?;
            // The eraser takes a band out of the mask (still one shape).
            b.keys("v").await?;
            let (x, y) = at(&b, STROKE[0].0 + 2.0, STROKE[0].1).await?;
            b.mouse_path(&[(x, y)]).await?;
            paint(&b, "e", &ERASE).await?;
        }
        if close_mid_task {
            // Straight away: what is on screen is saved as the page goes.
            b.close_tab().await?;
            open_task(&b, url, project, false).await?;
            wait_attribute(&b, "shapes", "3").await?;
        }
        let first = attribute(&b, "image").await?;
        b.keys(&key::ARROW_RIGHT.to_string()).await?;
        let deadline = tokio::time::Instant::now() + WAIT;
        while attribute(&b, "image").await? == first {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the next image never showed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        b.keys("2").await?;
        draw_box(&b, CUP_BOX).await?;
        if extra {
            draw_box(&b, EXTRA_BOX).await?;
        }
        wait_attribute(&b, "shapes", if extra { "2" } else { "1" }).await?;
        b.screenshot(&screenshots().join(format!("annotate-{who}.png"))).await?;
        b.click("button[data-action='submit']").await?;
        wait_attribute(&b, "submitted", "1").await?;
        anyhow::ensure!(save_state(&b).await? == "lost" || save_state(&b).await? == "submitted", "submitted and read-only");
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = b.screenshot(&screenshots().join(format!("annotate-{who}-failed.png"))).await;
    }
    result
}

async fn dataset_of_photos(w: &World, owner: &Api, data: &std::path::Path) -> anyhow::Result<u64> {
    let mut entries = Vec::new();
    for name in ["chelsea.png", "coffee.png"] {
        entries.push((name.to_owned(), std::fs::read(data.join("faces").join(name))?));
    }
    let id = new_dataset(owner, "photos").await?;
    let upload = Tus::new(w, &token(owner).await?).upload("photos.tar", &tar_of(&entries)).await?;
    let (status, body) = owner.post(&format!("/api/v1/datasets/{id}/versions"), json!({"uploads": [upload], "labels": "none"})).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "version: {status} {body}");
    Ok(id)
}

#[tokio::test]
async fn three_annotators_and_a_reviewer_in_chromium() -> anyhow::Result<()> {
    let (Some(data), Some(venv)) = (need("SUANLI_CV_DATA"), need("SUANLI_TORCH_VENV")) else {
        eprintln!("SUANLI_CV_DATA or SUANLI_TORCH_VENV is not set: skipping");
        return Ok(());
    };
    let Some(w) = World::start(Backend::Sqlite).await? else { return Ok(()) };
    let result = async {
        let owner = w.person("researcher", "olga").await?;
        let ann = w.person("researcher", "ann").await?;
        for name in ["bob", "cid", "rita"] {
            w.person("researcher", name).await?;
        }
        let d = dataset_of_photos(&w, &owner, &data).await?;
        let schema = json!({"classes": [{"name": "cat", "colour": "#e6194b"}, {"name": "cup", "colour": "#4363d8"}], "kinds": ["box", "polygon", "mask"]});
        let (status, p) =
            owner.post("/api/v1/annotation-projects", json!({"name": "photos", "dataset": d, "schema": schema, "task_size": 2, "overlap": 3})).await?;
        anyhow::ensure!(status == StatusCode::CREATED, "project: {status} {p}");
        let project = p["id"].as_u64().unwrap_or_default();
        for (name, role) in [("ann", "annotator"), ("bob", "annotator"), ("cid", "annotator"), ("rita", "reviewer")] {
            let (status, body) =
                owner.send(reqwest::Method::PUT, &format!("/api/v1/annotation-projects/{project}/members/{name}"), Some(json!({"role": role}))).await?;
            anyhow::ensure!(status == StatusCode::NO_CONTENT, "invite {name}: {status} {body}");
        }
        let url = w.portal.url.clone();
        annotate(&url, project, "ann", false, false, true).await?;
        annotate(&url, project, "bob", true, false, false).await?;
        annotate(&url, project, "cid", false, true, false).await?;
        check_erased_mask(&ann, project).await?;

        // The reviewer settles the one conflict in the page.
        let b = Browser::start().await?;
        browser_login(&b, &url, "rita").await?;
        b.goto(&format!("{url}/annotation/{project}")).await?;
        b.wait_for("#review article.conflict button[data-accept='cid']", WAIT).await?;
        let conflicts = b.execute("return document.querySelectorAll('#review article.conflict').length;", json!([])).await?;
        anyhow::ensure!(conflicts == 1, "one conflict: {conflicts}");
        b.screenshot(&screenshots().join("annotate-review.png")).await?;
        b.click("#review article.conflict button[data-accept='cid']").await?;
        b.wait_for("#review p.none", WAIT).await?;

        let (status, coco) = owner.get(&format!("/api/v1/annotation-projects/{project}/export?format=coco")).await?;
        anyhow::ensure!(status == StatusCode::OK, "export: {status} {coco}");
        check_with_pycocotools(&venv, &w, &coco)
    }
    .await;
    w.explain(result)
}

/// What ann saved: the stroke's pixels less the eraser's, to the pixel.
async fn check_erased_mask(ann: &Api, project: u64) -> anyhow::Result<()> {
    let (status, slots) = ann.get(&format!("/api/v1/annotation-projects/{project}/my-slots")).await?;
    anyhow::ensure!(status == StatusCode::OK, "my slots: {status} {slots}");
    let (task, slot) = (&slots[0]["task"], &slots[0]["slot"]);
    let (status, view) = ann.get(&format!("/api/v1/annotation-projects/{project}/tasks/{task}/slots/{slot}")).await?;
    anyhow::ensure!(status == StatusCode::OK, "slot: {status} {view}");
    // The cat is the task's first image (the photos in name order, no honeypots).
    let cat = &view["images"][0];
    anyhow::ensure!(cat["width"] == CAT_SIZE.0 && cat["height"] == CAT_SIZE.1, "the cat's photo first: {view}");
    let masks: Vec<&Value> = cat["shapes"].as_array().into_iter().flatten().filter(|s| s["type"] == "mask").collect();
    anyhow::ensure!(masks.len() == 1, "one mask: {masks:?}");
    let saved: suanli_annotation::Rle = serde_json::from_value(masks[0]["rle"].clone())?;
    let want = suanli_annotation::Rle::from_row_major(CAT_SIZE.0, CAT_SIZE.1, &painted(CAT_SIZE, &[(&STROKE, false), (&ERASE, true)]));
    anyhow::ensure!(saved == want, "the erased mask: saved {} px, painted {} px", saved.area(), want.area());
    Ok(())
}

/// pycocotools reads the export: each photo's objects are exactly what was drawn (boxes and
/// the polygon's vertices to the pixel; masks of the boxes their whole area; the brush mask's
/// pixels, decoded from its RLE).
fn check_with_pycocotools(venv: &std::path::Path, w: &World, coco: &Value) -> anyhow::Result<()> {
    let file = w.dir.path().join("export.json");
    std::fs::write(&file, serde_json::to_vec(coco)?)?;
    // Two of the three masks are the whole stroke, so the agreed mask is the whole stroke; its
    // pixels row by row, as numpy's nonzero() lists them.
    let stroke = painted(CAT_SIZE, &[(&STROKE, false)]);
    let pixels: Vec<[u32; 2]> =
        (0..CAT_SIZE.1).flat_map(|y| (0..CAT_SIZE.0).map(move |x| [x, y])).filter(|[x, y]| stroke[(y * CAT_SIZE.0 + x) as usize]).collect();
    let expected = json!({
        "chelsea.png": [["cat", [CAT_BOX.0, CAT_BOX.1, CAT_BOX.2, CAT_BOX.3], null, null], ["cat", null, EAR.iter().flat_map(|&(x, y)| [x, y]).collect::<Vec<_>>(), null],
            ["cat", null, null, pixels]],
        "coffee.png": [["cup", [CUP_BOX.0, CUP_BOX.1, CUP_BOX.2, CUP_BOX.3], null, null], ["cup", [EXTRA_BOX.0, EXTRA_BOX.1, EXTRA_BOX.2, EXTRA_BOX.3], null, null]],
    });
    let script = r#"
import json, sys
from pycocotools.coco import COCO
coco = COCO(sys.argv[1])
expected = json.loads(sys.argv[2])
names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
seen = {}
for img in coco.loadImgs(coco.getImgIds()):
    found = []
    for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
        seg = a.get("segmentation")
        if isinstance(seg, dict):
            assert isinstance(seg["counts"], list) and a["iscrowd"] == 0, "an uncompressed RLE mask"
            mask = coco.annToMask(a)
            assert mask.shape == (img["height"], img["width"]) and mask.sum() == a["area"], "the mask's area"
            found.append([names[a["category_id"]], None, None, [[int(x), int(y)] for y, x in zip(*mask.nonzero())]])
        elif seg:
            found.append([names[a["category_id"]], None, [round(v, 2) for v in seg[0]], None])
            mask = coco.annToMask(a)
            assert mask.shape == (img["height"], img["width"]) and mask.sum() > 0, "the polygon's mask"
        else:
            found.append([names[a["category_id"]], [round(v, 2) for v in a["bbox"]], None, None])
            assert abs(a["area"] - a["bbox"][2] * a["bbox"][3]) < 1e-6, "a box's area"
    seen[img["file_name"]] = sorted(found, key=json.dumps)
want = {k: sorted(v, key=json.dumps) for k, v in expected.items()}
assert seen == want, f"export {json.dumps(seen)[:2000]} != drawn {json.dumps(want)[:2000]}"
print("pycocotools agrees")
"#;
    let out = std::process::Command::new(venv.join("bin").join("python")).arg("-c").arg(script).arg(&file).arg(expected.to_string()).output()?;
    anyhow::ensure!(out.status.success(), "pycocotools: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(())
}
