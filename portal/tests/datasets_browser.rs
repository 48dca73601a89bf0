//! Datasets in headless Chromium: a researcher creates a dataset in the page, chooses a folder
//! of two class folders (a picture of several 1 MiB pieces and a broken one among them), starts
//! the upload, pauses it part way (the portal holds part of the large picture), reloads the page,
//! chooses the same folder again and uploads (pausing and resuming once more in the page): the
//! large picture goes on from where the portal got to, the version holds every good picture
//! with its class, the broken one is named with its reason, and the thumbnails load. The owner
//! shares the dataset from its page. Then the models page: empty for a researcher with none;
//! with two versions, a comparison and a promotion.
//! Screenshots are saved under `target/tmp/portal-screenshots/`.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use suanli_testkit::webdriver::Browser;
use support::{browser_login, screenshots, Api, Backend, World};

const WAIT: Duration = Duration::from_secs(30);
/// Chromium's upload speed while the upload is to be paused part way: the large picture takes
/// several seconds.
const SLOW_BYTES_PER_SECOND: u64 = 512 * 1024;

fn png(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb(pixel(x, y)));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

/// Noise does not compress: 1536×1536 RGB is a PNG of about 7 MiB (seven 1 MiB pieces), room
/// enough to pause twice part way however late a click lands.
fn noise_png(edge: u32) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let img = image::RgbImage::from_fn(edge, edge, |_, _| {
        let v = next().to_le_bytes();
        image::Rgb([v[0], v[1], v[2]])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

/// `digits/zero/{a,b}.png`, `digits/one/{c,big}.png`, the broken `digits/one/broken.png` and
/// an empty `digits/zero/empty.png` (which the page does not send).
/// Returns the `digits` folder and the large picture's size.
fn pictures(root: &Path) -> anyhow::Result<(PathBuf, u64)> {
    let top = root.join("digits");
    for class in ["zero", "one"] {
        std::fs::create_dir_all(top.join(class))?;
    }
    std::fs::write(top.join("zero/a.png"), png(40, 30, |x, y| [10, (x * 5) as u8, (y * 7) as u8]))?;
    std::fs::write(top.join("zero/b.png"), png(24, 24, |x, _| [20, 200, (x * 9) as u8]))?;
    std::fs::write(top.join("one/c.png"), png(32, 48, |_, y| [230, (y * 3) as u8, 40]))?;
    let big = noise_png(1536);
    anyhow::ensure!(big.len() > 6 << 20, "the large picture has {} bytes: more than six pieces wanted", big.len());
    std::fs::write(top.join("one/big.png"), &big)?;
    let mut broken = png(64, 64, |x, y| [(x * 3) as u8, (y * 3) as u8, 99]);
    broken.truncate(broken.len() / 2);
    std::fs::write(top.join("one/broken.png"), broken)?;
    std::fs::write(top.join("zero/empty.png"), b"")?;
    Ok((top, big.len() as u64))
}

/// The uploader's rows: name → data attributes.
async fn rows(b: &Browser) -> anyhow::Result<Vec<Value>> {
    let v = b
        .execute(
            "return [...document.querySelectorAll('tr.upload-file')].map(r => ({name: r.dataset.name, state: r.dataset.state, offset: Number(r.dataset.offset), \
             length: Number(r.dataset.length), upload: r.dataset.upload || null, resumed: r.dataset.resumedFrom === undefined ? null : Number(r.dataset.resumedFrom), \
             error: r.dataset.error || null}))",
            json!([]),
        )
        .await?;
    Ok(serde_json::from_value(v)?)
}

async fn row(b: &Browser, name: &str) -> anyhow::Result<Value> {
    rows(b).await?.into_iter().find(|r| r["name"] == name).ok_or_else(|| anyhow::anyhow!("no row for {name}"))
}

/// Chooses the folder in the page's folder input, as a person would in the file dialog.
async fn choose_folder(b: &Browser, folder: &Path) -> anyhow::Result<()> {
    b.type_into("section.upload input[name=folder]", &folder.display().to_string()).await?;
    let names: Vec<String> = rows(b).await?.iter().filter_map(|r| r["name"].as_str().map(str::to_owned)).collect();
    let mut sorted = names.clone();
    sorted.sort();
    // The one folder every file is under is dropped: the class folders make the labels.
    anyhow::ensure!(sorted == ["one/big.png", "one/broken.png", "one/c.png", "zero/a.png", "zero/b.png", "zero/empty.png"], "chosen: {names:?}");
    let empty = row(b, "zero/empty.png").await?;
    anyhow::ensure!(empty["state"] == "skipped", "an empty file is not sent: {empty}");
    Ok(())
}

/// Where the portal has an upload got to (tus HEAD, with the researcher's own session).
async fn portal_offset(api: &Api, upload: &str) -> anyhow::Result<(StatusCode, Option<u64>, Option<u64>)> {
    let res = api.http.head(format!("{}{upload}", api.base)).header("tus-resumable", "1.0.0").send().await?;
    let header = |name: &str| res.headers().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    Ok((res.status(), header("upload-offset"), header("upload-length")))
}

async fn journey(w: &World, b: &Browser) -> anyhow::Result<()> {
    let url = &w.portal.url;
    let mei = w.person("researcher", "mei_lin").await?;
    let dir = tempfile::tempdir()?;
    let (folder, big_length) = pictures(dir.path())?;

    browser_login(b, url, "mei_lin").await?;
    b.goto(&format!("{url}/datasets")).await?;
    b.wait_for("p.empty", WAIT).await?;
    b.type_into("form.api input[name=name]", "digits").await?;
    b.type_into("form.api textarea[name=description]", "zeros and ones").await?;
    b.click("form.api button[type=submit]").await?;
    let page = b.wait_url("/datasets/", WAIT).await?;
    let id: u64 = page.rsplit('/').next().unwrap_or_default().parse()?;
    b.wait_for("section.upload", WAIT).await?;
    b.screenshot(&screenshots().join("dataset-new.png")).await?;

    // Slowly, so that the large picture is part way when Pause is clicked.
    b.throttle(Some(SLOW_BYTES_PER_SECOND)).await?;
    choose_folder(b, &folder).await?;
    b.type_into("section.upload input[name=message]", "first pictures").await?;
    b.click("button[data-upload=start]").await?;
    let partial = suanli_testkit::eventually(WAIT, Duration::from_millis(50), || async {
        let r = row(b, "one/big.png").await.ok()?;
        let offset = r["offset"].as_u64()?;
        (offset > 0 && offset < big_length).then_some(offset)
    })
    .await?;
    b.click("button[data-upload=pause]").await?;
    let paused = suanli_testkit::eventually(WAIT, Duration::from_millis(50), || async {
        let r = row(b, "one/big.png").await.ok()?;
        (r["state"] == "paused").then_some(r)
    })
    .await?;
    b.execute("document.querySelector('section.upload').scrollIntoView()", json!([])).await?;
    b.screenshot(&screenshots().join("dataset-paused.png")).await?;
    let upload = paused["upload"].as_str().ok_or_else(|| anyhow::anyhow!("no upload address: {paused}"))?.to_owned();
    // The portal holds part of the picture: what the page saw arrive, and not all of it. (An
    // aborted piece keeps the bytes that reached the portal, so HEAD may say a little more.)
    let (status, held, length) = portal_offset(&mei, &upload).await?;
    anyhow::ensure!(status == StatusCode::OK && length == Some(big_length), "HEAD {upload}: {status} {length:?}");
    let held = held.unwrap_or_default();
    anyhow::ensure!(held >= partial && held < big_length, "the portal holds {held} of {big_length} bytes; the page saw {partial}");
    // No version yet, and nothing was uploaded twice in the pause.
    let (_, d) = mei.get(&format!("/api/v1/datasets/{id}")).await?;
    anyhow::ensure!(d["latest_version"] == 0, "no version while paused: {d}");

    // After a reload the page knows nothing but what it kept: choosing the same files finds
    // their uploads and goes on from where the portal got to.
    b.goto(&format!("{url}/datasets/{id}")).await?;
    b.wait_for("section.upload", WAIT).await?;
    anyhow::ensure!(rows(b).await?.is_empty(), "a reloaded page starts with no rows");
    choose_folder(b, &folder).await?;
    b.type_into("section.upload input[name=message]", "first pictures").await?;
    b.click("button[data-upload=start]").await?;
    // Paused and resumed in the page too: Resume asks the portal where it got to and goes on.
    suanli_testkit::eventually(WAIT, Duration::from_millis(50), || async {
        let r = row(b, "one/big.png").await.ok()?;
        (r["offset"].as_u64()? > held && r["offset"].as_u64()? < big_length).then_some(())
    })
    .await
    .map_err(|e| e.context("a piece more of the large picture after the reload"))?;
    b.click("button[data-upload=pause]").await?;
    suanli_testkit::eventually(WAIT, Duration::from_millis(50), || async { (row(b, "one/big.png").await.ok()?["state"] == "paused").then_some(()) }).await?;
    b.throttle(None).await?;
    b.click("button[data-upload=resume]").await?;
    let result = b.wait_for("output.upload-result[data-version]", WAIT).await;
    if let Err(e) = result {
        anyhow::bail!("no version after the resumed upload: {e:#}; rows {:?}", rows(b).await?);
    }
    let big = row(b, "one/big.png").await?;
    let resumed = big["resumed"].as_u64().unwrap_or_default();
    anyhow::ensure!(
        resumed >= held && resumed < big_length && big["state"] == "done",
        "the large picture resumed from {resumed} (the portal held {held}): {big}"
    );
    anyhow::ensure!(big["upload"].as_str() == Some(upload.as_str()), "the same upload went on: {big}");
    let states: Vec<Value> = rows(b).await?;
    anyhow::ensure!(
        states.iter().all(|r| r["name"] == "zero/empty.png" || r["state"] == "done" && r["offset"] == r["length"]),
        "every file but the empty one arrived: {states:?}"
    );

    // What the upload made, as the page says it.
    let said = b
        .execute(
            "const o = document.querySelector('output.upload-result'); return {version: Number(o.dataset.version), items: Number(o.dataset.items), \
             rejected: [...o.querySelectorAll('li[data-name]')].map(li => [li.dataset.name, li.textContent])}",
            json!([]),
        )
        .await?;
    anyhow::ensure!(said["version"] == 1 && said["items"] == 4, "version 1 with the four good pictures: {said}");
    let rejected = said["rejected"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(
        rejected.len() == 1 && rejected[0][0] == "one/broken.png" && rejected[0][1].as_str().is_some_and(|t| t.len() > "one/broken.png — ".len()),
        "the broken picture with its reason: {rejected:?}"
    );
    // The page's own sections were read again: the version, the labels, the rejected file.
    let shown = b
        .execute(
            "return {versions: [...document.querySelectorAll('table.versions tr[data-version]')].map(r => [Number(r.dataset.version), Number(r.dataset.items)]), \
             labels: Object.fromEntries([...document.querySelectorAll('table.labels tr[data-label]')].map(r => [r.dataset.label, Number(r.dataset.count)])), \
             rejected: [...document.querySelectorAll('table.rejected tr[data-name]')].map(r => [r.dataset.name, r.querySelector('.reason').textContent])}",
            json!([]),
        )
        .await?;
    anyhow::ensure!(shown["versions"] == json!([[1, 4]]), "versions shown: {shown}");
    anyhow::ensure!(shown["labels"] == json!({"one": 2, "zero": 2}), "labels shown: {shown}");
    anyhow::ensure!(
        shown["rejected"].as_array().is_some_and(|r| r.len() == 1 && r[0][0] == "one/broken.png" && r[0][1].as_str().is_some_and(|t| !t.trim().is_empty())),
        "rejected shown: {shown}"
    );
    // The REST API agrees, and the uploads are used up (and forgotten by the page).
    let (status, v) = mei.get(&format!("/api/v1/datasets/{id}/versions/1")).await?;
    anyhow::ensure!(status == StatusCode::OK && v["message"] == "first pictures", "version 1: {status} {v}");
    let names: Vec<&str> = v["files"].as_array().into_iter().flatten().filter_map(|f| f["name"].as_str()).collect();
    anyhow::ensure!(names == ["one/big.png", "one/c.png", "zero/a.png", "zero/b.png"], "files: {names:?}");
    anyhow::ensure!(portal_offset(&mei, &upload).await?.0 == StatusCode::NOT_FOUND, "the used upload is gone");
    let kept = b.execute("return Object.keys(localStorage).filter(k => k.startsWith('suanli-upload:')).length", json!([])).await?;
    anyhow::ensure!(kept == 0, "{kept} uploads still remembered after the version");

    // Every thumbnail loads once it is in view.
    suanli_testkit::eventually(WAIT, Duration::from_millis(200), || async {
        let v = b
            .execute(
                "const imgs = [...document.querySelectorAll('section.thumbnails img')]; imgs.forEach(i => i.scrollIntoView()); \
                 return imgs.map(i => i.complete ? i.naturalWidth : 0)",
                json!([]),
            )
            .await
            .ok()?;
        let widths: Vec<u64> = serde_json::from_value(v).ok()?;
        (widths.len() == 4 && widths.iter().all(|w| *w > 0 && *w <= 128)).then_some(())
    })
    .await
    .map_err(|e| e.context("four thumbnails, each loaded and at most 128 px wide"))?;
    b.execute("window.scrollTo(0, 0)", json!([])).await?;
    b.screenshot(&screenshots().join("dataset-version.png")).await?;
    b.execute("document.querySelector('section.upload').scrollIntoView()", json!([])).await?;
    b.screenshot(&screenshots().join("dataset-uploaded.png")).await?;

    // The owner shares it from the page (the username goes into the address).
    let kai = w.person("researcher", "kai_chen").await?;
    b.type_into("section.shares input[name=username]", "kai_chen").await?;
    b.click("section.shares form.api[data-method=PUT] button[type=submit]").await?;
    b.wait_for("section.shares li[data-user=kai_chen]", WAIT).await?;
    let (_, d) = mei.get(&format!("/api/v1/datasets/{id}")).await?;
    anyhow::ensure!(d["shared_with"] == json!(["kai_chen"]), "shared: {d}");
    // Whom it is shared with reads it, and is offered neither uploads nor shares.
    let seen = kai.http.get(format!("{url}/datasets/{id}")).send().await?;
    anyhow::ensure!(seen.status() == StatusCode::OK, "kai reads the page: {}", seen.status());
    let seen = seen.text().await?;
    anyhow::ensure!(
        seen.contains("one/big.png") && !seen.contains("section class=\"upload\"") && !seen.contains("section class=\"shares\""),
        "kai's page: {seen}"
    );

    // The list of datasets shows it with its files.
    b.goto(&format!("{url}/datasets")).await?;
    let listed = b.wait_text(&format!("table.datasets tr[data-dataset='{id}'] td.items"), WAIT).await?;
    anyhow::ensure!(listed.trim() == "4", "files listed: {listed}");
    b.screenshot(&screenshots().join("datasets.png")).await?;

    // A researcher without models sees the empty state.
    b.goto(&format!("{url}/models")).await?;
    let empty = b.wait_text("main p.empty", WAIT).await?;
    anyhow::ensure!(empty.contains("No models yet"), "{empty}");
    anyhow::ensure!(b.find("table.models").await.is_err(), "no table without models");
    b.screenshot(&screenshots().join("models-empty.png")).await?;

    // With two registered versions (written straight into the registry: registering needs a
    // succeeded job), the page compares them and promotes one.
    register_models(w, "mei_lin").await?;
    b.goto(&format!("{url}/models")).await?;
    let serving = b.wait_text("table.models tr[data-model=digits-cls] td.serving", WAIT).await?;
    anyhow::ensure!(serving.trim() == "—", "nothing serves yet: {serving}");
    b.click("table.models tr[data-model=digits-cls] a").await?;
    b.wait_url("/models/digits-cls", WAIT).await?;
    b.click("form.compare button[type=submit]").await?;
    b.wait_for("form.compare table.comparison:not(.hidden) tr[data-metric]", WAIT).await?;
    let compared = b
        .execute(
            "return Object.fromEntries([...document.querySelectorAll('table.comparison tr[data-metric]')].map(r => [r.dataset.metric, [...r.cells].slice(1).map(c => c.textContent)]))",
            json!([]),
        )
        .await?;
    anyhow::ensure!(
        compared == json!({"accuracy": ["0.75", "0.875", "+0.125"], "loss": ["0.5", "—", "—"], "macro_f1": ["—", "0.8", "—"]}),
        "v1 against v2: {compared}"
    );
    b.screenshot(&screenshots().join("model.png")).await?;
    b.click("table.model-versions tr[data-version='1'] form.api button[type=submit]").await?;
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
        let v = b.execute("return document.querySelector('tr[data-serving=true]')?.dataset.version || null", json!([])).await.ok()?;
        (v == "1").then_some(())
    })
    .await?;
    let (_, model) = mei.get("/api/v1/models/digits-cls").await?;
    anyhow::ensure!(model["serving"] == 1, "v1 serves: {model}");
    Ok(())
}

/// Two versions of `digits-cls` for `username`, as registering two jobs' outputs would leave them.
async fn register_models(w: &World, username: &str) -> anyhow::Result<()> {
    let db = suanli_portal::db::Db::connect(&w.database_url()).await?;
    let owner: i64 = sqlx::Row::try_get(&sqlx::query("SELECT id FROM users WHERE username = $1").bind(username).fetch_one(&db.pool).await?, "id")?;
    let model = 4242_i64;
    sqlx::query("INSERT INTO models (id, owner, name, created_ms) VALUES ($1, $2, 'digits-cls', 1764581400000)")
        .bind(model)
        .bind(owner)
        .execute(&db.pool)
        .await?;
    for (version, metrics) in [(1_i64, r#"{"accuracy": 0.75, "loss": 0.5}"#), (2, r#"{"accuracy": 0.875, "macro_f1": 0.8}"#)] {
        sqlx::query(
            "INSERT INTO model_versions (model_id, version, job_id, job_name, output, sha256, dataset, lineage, metrics, card, created_ms) \
             VALUES ($1, $2, $3, 'digits-train', 'model.safetensors', $4, $5, '{}', $6, $7, $8)",
        )
        .bind(model)
        .bind(version)
        .bind(version + 100)
        .bind(format!("{:064x}", version))
        .bind(format!("{username}/digits@{version}"))
        .bind(metrics)
        .bind(format!("# digits-cls v{version}\n\nA small classifier of zeros and ones."))
        .bind(1_764_581_400_000 + version * 60_000)
        .execute(&db.pool)
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn datasets_upload_pause_reload_resume_in_chromium() -> anyhow::Result<()> {
    let Some(w) = World::start(Backend::Sqlite).await? else { return Ok(()) };
    let b = Browser::start().await?;
    let result = tokio::time::timeout(Duration::from_secs(240), journey(&w, &b)).await.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
    if result.is_err() {
        let _ = b.screenshot(&screenshots().join("datasets-failure.png")).await;
    }
    w.explain(result)
}
