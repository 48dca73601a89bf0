//! Datasets through the portal's REST API against a real portal process (SQLite and
//! PostgreSQL): resumable tus uploads (one cut mid-body), imports that name every bad file,
//! hashes and quotas refused before anything is kept, shares, archives, and strangers.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use support::{new_dataset, sha_hex, tar_of, token, Api, Backend, Tus, World};

fn png(width: u32, height: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([shade, (x * 7) as u8, (y * 5) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

/// Two classes of 6 pictures, and one picture cut in half.
fn folder() -> Vec<(String, Vec<u8>)> {
    let mut entries = Vec::new();
    for i in 0..6u8 {
        entries.push((format!("red/{i}.png"), png(40, 30, 200 + i)));
        entries.push((format!("blue/{i}.png"), png(40, 30, 10 + i)));
    }
    let mut cut = png(64, 64, 99);
    cut.truncate(cut.len() / 2);
    entries.push(("blue/cut.png".into(), cut));
    entries
}

async fn storage_used(api: &Api) -> anyhow::Result<u64> {
    let (status, s) = api.get("/api/v1/me/storage").await?;
    anyhow::ensure!(status == StatusCode::OK, "storage: {status} {s}");
    Ok(s["used_bytes"].as_u64().unwrap_or(u64::MAX))
}

/// An upload cut off mid-body keeps what arrived; `HEAD` says where to go on; the rest
/// completes it; the import names the bad picture and takes the rest, by class folder.
async fn resumed_upload_imports_a_folder(w: &World) -> anyhow::Result<()> {
    let alice = w.person("researcher", "alice").await?;
    let tus = Tus::new(w, &token(&alice).await?);
    let id = new_dataset(&alice, "colours").await?;
    let archive = tar_of(&folder());
    let (status, body, location) = tus.create("colours.tar", archive.len() as u64, &sha_hex(&archive)).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "create: {status} {body}");
    let location = location.ok_or_else(|| anyhow::anyhow!("no Location"))?;

    // The first third arrives; then a PATCH whose connection breaks part way.
    let third = archive.len() / 3;
    let (status, _) = tus.patch(&location, 0, archive[..third].to_vec().into()).await?;
    anyhow::ensure!(status == StatusCode::NO_CONTENT, "first PATCH: {status}");
    let sent = archive[third..2 * third].to_vec();
    let broken = futures::stream::iter(vec![Ok::<_, std::io::Error>(sent), Err(std::io::Error::other("the line went dead"))]);
    let _ = tus.patch(&location, third as u64, reqwest::Body::wrap_stream(broken)).await;
    let (status, offset) = tus.offset(&location).await?;
    anyhow::ensure!(status == StatusCode::OK && (third as u64..=2 * third as u64).contains(&offset), "after the cut: {status}, offset {offset}");

    // A PATCH at a stale offset changes nothing.
    if offset > 0 {
        let (status, body) = tus.patch(&location, offset - 1, vec![0u8; 10].into()).await?;
        anyhow::ensure!(status == StatusCode::CONFLICT && Api::code(&body) == "UPLOAD_OFFSET_MISMATCH", "stale offset: {status} {body}");
        anyhow::ensure!(tus.offset(&location).await?.1 == offset, "a refused PATCH moved the offset");
    }
    let (status, body) = tus.patch(&location, offset, archive[offset as usize..].to_vec().into()).await?;
    anyhow::ensure!(status == StatusCode::NO_CONTENT, "resumed PATCH: {status} {body}");
    let upload = location.rsplit('/').next().unwrap_or_default();

    let (status, v) = alice.post(&format!("/api/v1/datasets/{id}/versions"), json!({"uploads": [upload], "message": "first pictures"})).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "version: {status} {v}");
    anyhow::ensure!(v["version"] == 1 && v["items"] == 12, "version 1 with 12 pictures: {v}");
    anyhow::ensure!(v["labels"]["red"] == 6 && v["labels"]["blue"] == 6, "labels: {}", v["labels"]);
    let rejected = v["rejected"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(
        rejected.len() == 1
            && rejected[0]["name"] == "blue/cut.png"
            && rejected[0]["kind"] == "corrupt"
            && !rejected[0]["reason"].as_str().unwrap_or_default().is_empty(),
        "the cut picture, named with its reason: {rejected:?}"
    );
    // The upload is used up.
    let (status, _) = tus.offset(&location).await?;
    anyhow::ensure!(status == StatusCode::NOT_FOUND, "a used upload is gone: {status}");

    // The archive gives back exactly the files listed, byte for byte.
    let (status, listed) = alice.get(&format!("/api/v1/datasets/{id}/versions/1")).await?;
    anyhow::ensure!(status == StatusCode::OK, "version: {status} {listed}");
    let want: std::collections::BTreeMap<String, String> = listed["files"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| (f["name"].as_str().unwrap_or_default().to_owned(), f["sha256"].as_str().unwrap_or_default().to_owned()))
        .collect();
    let tar_bytes = tus.http.get(format!("{}/api/v1/datasets/{id}/versions/1/archive", w.portal.url)).bearer_auth(&tus.token).send().await?.bytes().await?;
    let mut got = std::collections::BTreeMap::new();
    let mut reader = tar::Archive::new(std::io::Cursor::new(tar_bytes.to_vec()));
    for entry in reader.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.display().to_string();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes)?;
        got.insert(name, sha_hex(&bytes));
    }
    anyhow::ensure!(got == want, "archive {got:?} against the list {want:?}");
    let expected: std::collections::BTreeMap<String, String> =
        folder().iter().filter(|(n, _)| n != "blue/cut.png").map(|(n, b)| (n.clone(), sha_hex(b))).collect();
    anyhow::ensure!(want == expected, "what was pushed is what is listed");

    // A thumbnail is a small PNG.
    let thumb = tus.http.get(format!("{}/api/v1/datasets/{id}/versions/1/files/red/0.png?thumbnail=16", w.portal.url)).bearer_auth(&tus.token).send().await?;
    anyhow::ensure!(thumb.status() == StatusCode::OK, "thumbnail: {}", thumb.status());
    let thumb = image::load_from_memory(&thumb.bytes().await?)?;
    anyhow::ensure!(thumb.width() <= 16 && thumb.height() <= 16, "thumbnail {}x{}", thumb.width(), thumb.height());

    // Version 2 removes a picture and adds one; the changes are recorded; the same upload
    // content again makes no version.
    let extra = Tus::upload(&tus, "red/new.png", &png(8, 8, 250)).await?;
    let (status, v2) = alice.post(&format!("/api/v1/datasets/{id}/versions"), json!({"uploads": [extra], "remove": ["blue/0.png"], "message": "swap"})).await?;
    anyhow::ensure!(status == StatusCode::CREATED && v2["version"] == 2 && v2["items"] == 12, "version 2: {status} {v2}");
    anyhow::ensure!(v2["changes"]["added"] == json!(["red/new.png"]) && v2["changes"]["removed"] == json!(["blue/0.png"]), "changes: {}", v2["changes"]);
    let again = Tus::upload(&tus, "red/new.png", &png(8, 8, 250)).await?;
    let (status, same) = alice.post(&format!("/api/v1/datasets/{id}/versions"), json!({"uploads": [again]})).await?;
    anyhow::ensure!(status == StatusCode::OK && same["version"] == 2 && same["added"] == 0 && same["modified"] == 0, "unchanged content: {status} {same}");
    // A split is the same every time it is asked for, covers every file once, and keeps
    // each label's share when stratified.
    let path = format!("/api/v1/datasets/{id}/versions/2/split?train=0.5&val=0.25&test=0.25&method=stratified&seed=7");
    let (status, one) = alice.get(&path).await?;
    let (_, two) = alice.get(&path).await?;
    anyhow::ensure!(status == StatusCode::OK && one == two, "split: {status} {one}");
    let parts: Vec<usize> = ["train", "val", "test"].iter().map(|k| one[k].as_array().map_or(0, Vec::len)).collect();
    anyhow::ensure!(parts.iter().sum::<usize>() == 12 && parts[0] == 6, "split sizes {parts:?}: {one}");
    let (status, bad) = alice.get(&format!("/api/v1/datasets/{id}/versions/2/split?train=0.9&val=0.9&test=0")).await?;
    anyhow::ensure!(status == StatusCode::BAD_REQUEST, "ratios past 1: {status} {bad}");
    // IDs the API hands out stay within what JavaScript holds exactly.
    anyhow::ensure!(id < (1 << 53), "dataset ID {id} is past 2^53");
    Ok(())
}

/// Bytes that do not hash to what the upload announced are refused at the end, and nothing of
/// them stays: not the upload, not its bytes, not the quota it held.
async fn a_wrong_hash_is_refused_and_leaves_nothing(w: &World) -> anyhow::Result<()> {
    let carol = w.person("researcher", "carol").await?;
    let tus = Tus::new(w, &token(&carol).await?);
    let bytes = png(20, 20, 5);
    let (status, body, location) = tus.create("liar.png", bytes.len() as u64, &sha_hex(b"something else")).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "create: {status} {body}");
    let location = location.unwrap_or_default();
    anyhow::ensure!(storage_used(&carol).await? == bytes.len() as u64, "an upload under way counts against the quota");
    let (status, body) = tus.patch(&location, 0, bytes.into()).await?;
    anyhow::ensure!(status.as_u16() == 460 && Api::code(&body) == "CHECKSUM_MISMATCH", "mismatch: {status} {body}");
    let (status, _) = tus.offset(&location).await?;
    anyhow::ensure!(status == StatusCode::NOT_FOUND, "the upload is gone: {status}");
    anyhow::ensure!(storage_used(&carol).await? == 0, "nothing is held");
    let staged = w.dir.path().join("portal-datasets").join("uploads").join(location.rsplit('/').next().unwrap_or_default());
    anyhow::ensure!(!staged.exists(), "{} is left behind", staged.display());
    Ok(())
}

/// Other researchers see nothing of a dataset or an upload (NOT_FOUND, as for what does not
/// exist); a share lets one read it, never write it; unsharing takes it away again.
async fn strangers_and_shares(w: &World) -> anyhow::Result<()> {
    let dave = w.person("researcher", "dave").await?;
    let erin = w.person("researcher", "erin").await?;
    let dave_tus = Tus::new(w, &token(&dave).await?);
    let erin_tus = Tus::new(w, &token(&erin).await?);
    let id = new_dataset(&dave, "private").await?;
    let upload = dave_tus.upload("pic.png", &png(10, 10, 1)).await?;
    let (status, v) = dave.post(&format!("/api/v1/datasets/{id}/versions"), json!({"uploads": [upload]})).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "dave's version: {status} {v}");

    for path in [format!("/api/v1/datasets/{id}"), format!("/api/v1/datasets/{id}/versions/1"), format!("/api/v1/datasets/{id}/versions/1/files/pic.png")] {
        let (status, body) = erin.get(&path).await?;
        anyhow::ensure!(status == StatusCode::NOT_FOUND, "erin reads {path}: {status} {body}");
    }
    let (status, list) = erin.get("/api/v1/datasets").await?;
    anyhow::ensure!(status == StatusCode::OK && list.as_array().is_some_and(Vec::is_empty), "erin's list: {list}");
    // Erin's own upload cannot go into dave's dataset, and dave's uploads are not hers.
    let hers = erin_tus.upload("x.png", &png(6, 6, 2)).await?;
    let (status, body) = erin.post(&format!("/api/v1/datasets/{id}/versions"), json!({"uploads": [hers]})).await?;
    anyhow::ensure!(status == StatusCode::NOT_FOUND, "erin writes dave's dataset: {status} {body}");
    let daves_pending = dave_tus.create("y.png", 10, &sha_hex(b"0123456789")).await?.2.unwrap_or_default();
    let (status, _) = erin_tus.patch(&daves_pending, 0, b"0123456789".to_vec().into()).await?;
    anyhow::ensure!(status == StatusCode::NOT_FOUND, "erin writes dave's upload: {status}");
    anyhow::ensure!(dave_tus.offset(&daves_pending).await?.1 == 0, "dave's upload changed");

    let (status, _) = dave.send(reqwest::Method::PUT, &format!("/api/v1/datasets/{id}/shares/erin"), None).await?;
    anyhow::ensure!(status == StatusCode::NO_CONTENT, "share: {status}");
    let (status, seen) = erin.get(&format!("/api/v1/datasets/{id}")).await?;
    anyhow::ensure!(status == StatusCode::OK && seen["owner"] == "dave" && seen["mine"] == false, "shared: {status} {seen}");
    let (status, body) = erin.post(&format!("/api/v1/datasets/{id}/versions"), json!({"uploads": [hers]})).await?;
    anyhow::ensure!(status == StatusCode::FORBIDDEN, "a share does not write: {status} {body}");
    let (status, v) = dave.get(&format!("/api/v1/datasets/{id}")).await?;
    anyhow::ensure!(status == StatusCode::OK && v["latest_version"] == 1, "nothing changed: {v}");

    let (status, _) = dave.send(reqwest::Method::DELETE, &format!("/api/v1/datasets/{id}/shares/erin"), None).await?;
    anyhow::ensure!(status == StatusCode::NO_CONTENT, "unshare: {status}");
    let (status, _) = erin.get(&format!("/api/v1/datasets/{id}")).await?;
    anyhow::ensure!(status == StatusCode::NOT_FOUND, "after unsharing: {status}");
    Ok(())
}

async fn run(backend: Backend, scenario: for<'a> fn(&'a World) -> futures::future::BoxFuture<'a, anyhow::Result<()>>) -> anyhow::Result<()> {
    let Some(w) = World::start(backend).await? else { return Ok(()) };
    w.explain(tokio::time::timeout(Duration::from_secs(240), scenario(&w)).await.map_err(|_| anyhow::anyhow!("timed out")).and_then(|r| r))
}

#[tokio::test]
async fn resumed_upload_imports_a_folder_on_sqlite() -> anyhow::Result<()> {
    run(Backend::Sqlite, |w| Box::pin(resumed_upload_imports_a_folder(w))).await
}

#[tokio::test]
async fn resumed_upload_imports_a_folder_on_postgres() -> anyhow::Result<()> {
    run(Backend::Postgres, |w| Box::pin(resumed_upload_imports_a_folder(w))).await
}

#[tokio::test]
async fn a_wrong_hash_is_refused_and_leaves_nothing_on_sqlite() -> anyhow::Result<()> {
    run(Backend::Sqlite, |w| Box::pin(a_wrong_hash_is_refused_and_leaves_nothing(w))).await
}

#[tokio::test]
async fn strangers_see_nothing_and_shares_only_read_on_postgres() -> anyhow::Result<()> {
    run(Backend::Postgres, |w| Box::pin(strangers_and_shares(w))).await
}

#[tokio::test]
async fn strangers_see_nothing_and_shares_only_read_on_sqlite() -> anyhow::Result<()> {
    run(Backend::Sqlite, |w| Box::pin(strangers_and_shares(w))).await
}

/// Quotas are checked when an upload is created: the bytes are never sent.
#[tokio::test]
async fn a_quota_overrun_is_refused_before_the_bytes_are_sent() -> anyhow::Result<()> {
    let Some(w) = World::start_with(Backend::Sqlite, &["--dataset-quota-bytes".into(), "5000".into()]).await? else { return Ok(()) };
    let result = async {
        let frank = w.person("researcher", "frank").await?;
        let tus = Tus::new(&w, &token(&frank).await?);
        let (status, body, location) = tus.create("big.tar", 5001, &sha_hex(b"x")).await?;
        anyhow::ensure!(
            status == StatusCode::PAYLOAD_TOO_LARGE && Api::code(&body) == "QUOTA_EXCEEDED" && location.is_none(),
            "over the quota: {status} {body}"
        );
        anyhow::ensure!(storage_used(&frank).await? == 0, "nothing held");
        let (status, body, fits) = tus.create("fits.tar", 4000, &sha_hex(b"x")).await?;
        anyhow::ensure!(status == StatusCode::CREATED, "within the quota: {status} {body}");
        let (status, body, _) = tus.create("second.tar", 1001, &sha_hex(b"x")).await?;
        anyhow::ensure!(status == StatusCode::PAYLOAD_TOO_LARGE, "an upload under way counts: {status} {body}");
        let (status, _) = frank.send(reqwest::Method::DELETE, &fits.unwrap_or_default(), None).await?;
        anyhow::ensure!(status == StatusCode::NO_CONTENT, "delete the waiting upload: {status}");

        // A small archive that unpacks to more than the quota: refused when it is imported,
        // and no version is made.
        let mut tiff = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(image::RgbImage::new(64, 64)).write_to(&mut tiff, image::ImageFormat::Tiff)?;
        let tar = tar_of(&[("black/a.tiff".into(), tiff.into_inner())]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &tar)?;
        let packed = gz.finish()?;
        anyhow::ensure!(packed.len() < 2000, "the archive is small: {} bytes", packed.len());
        let id = new_dataset(&frank, "bomb").await?;
        let upload = tus.upload("bomb.tgz", &packed).await?;
        let (status, body) = frank.post(&format!("/api/v1/datasets/{id}/versions"), json!({"uploads": [upload]})).await?;
        anyhow::ensure!(status == StatusCode::PAYLOAD_TOO_LARGE && Api::code(&body) == "QUOTA_EXCEEDED", "unpacked past the quota: {status} {body}");
        let (_, d) = frank.get(&format!("/api/v1/datasets/{id}")).await?;
        anyhow::ensure!(d["latest_version"] == 0, "no version was made: {d}");
        Ok(())
    }
    .await;
    w.explain(result)
}

/// The same day with the datasets' files in a real S3-compatible server (SeaweedFS): what is
/// pushed there comes back byte for byte, and nothing of it stays on the portal's disk.
#[tokio::test]
async fn datasets_kept_in_an_s3_bucket_come_back_whole() -> anyhow::Result<()> {
    use suanli_testkit::s3::{S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
    let s3_dir = tempfile::TempDir::new()?;
    let s3 = S3Server::start(s3_dir.path()).await?;
    s3.create_bucket("datasets").await?;
    let config = s3_dir.path().join("portal.toml");
    std::fs::write(
        &config,
        format!(
            "[portal.datasets_bucket]\nendpoint = \"{}\"\nbucket = \"datasets\"\naccess_key_id = \"{ACCESS_KEY_ID}\"\nprefix = \"suanli/datasets/\"\n",
            s3.endpoint
        ),
    )?;
    // The portal reads the bucket's secret from its environment, which it inherits.
    std::env::set_var("SUANLI_S3_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY);
    let Some(w) = World::start_with(Backend::Sqlite, &["--config".into(), config.display().to_string()]).await? else { return Ok(()) };
    let result = resumed_upload_imports_a_folder(&w).await;
    let result = result.and_then(|()| {
        let local = w.dir.path().join("portal-datasets").join("blobs");
        anyhow::ensure!(!local.exists() || std::fs::read_dir(&local)?.next().is_none(), "files were kept on the portal's disk at {}", local.display());
        Ok(())
    });
    if result.is_err() {
        eprintln!("--- S3 server ---\n{}", s3.log());
    }
    w.explain(result)
}
