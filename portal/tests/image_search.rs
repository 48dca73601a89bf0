//! Similar-image search through a real portal process with a real embedder (`suanli-job serve`
//! in embed mode, libtorch on the CPU) on the CV test photos: a library indexed from a dataset
//! finds each photo's mirrored, resized and recompressed copies; indexing twice adds nothing; a
//! researcher's library never shows to another; a removed picture is never found again, also
//! after a restart; bad queries are refused with the reason; an index never mixes two models.
//! Needs SUANLI_JOB_BINARY and SUANLI_CV_DATA (.ci/run sets both).

mod support;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use suanli_testkit::embedder::{job_binary, start as start_embedder, TOKEN as EMBEDDER_TOKEN};
use suanli_testkit::portal::{PortalOptions, PortalProcess};
use support::{new_dataset, sha_hex, tar_of, token, Api, Backend, Tus, World};

const PHOTOS: [&str; 5] = ["astronaut", "camera", "chelsea", "coffee", "rocket"];

struct Setup {
    world: World,
    embedder: suanli_testkit::Service,
    job: PathBuf,
    photos: PathBuf,
}

/// A portal searching with an embedder, or `None` where this run has no torch build.
async fn setup(backend: Backend) -> anyhow::Result<Option<Setup>> {
    let Some(job) = job_binary() else { return Ok(None) };
    let Some(data) = std::env::var_os("SUANLI_CV_DATA").map(PathBuf::from) else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "SUANLI_CV_DATA must be set under CI=true");
        return Ok(None);
    };
    let dir = tempfile::tempdir()?;
    let embedder = start_embedder(&job, dir.path(), 7).await?;
    let url = embedder.get("url")?.to_owned();
    let token_file = dir.path().join("embedder-token");
    std::fs::write(&token_file, EMBEDDER_TOKEN)?;
    let flags = ["--image-embedder-url".into(), url, "--image-embedder-token-file".into(), token_file.display().to_string()];
    let Some(world) = World::start_with(backend, &flags).await? else { return Ok(None) };
    // The embedder's files live as long as the world's folder.
    std::mem::forget(dir);
    Ok(Some(Setup { world, embedder, job, photos: data.join("faces") }))
}

fn photo_bytes(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(format!("{name}.png"))).expect("test photo")
}

/// The test photos as a dataset of `api`'s, indexed into `library`; the dataset's ID.
async fn index_photos(s: &Setup, api: &Api, dataset: &str, library: &str) -> anyhow::Result<u64> {
    let tus = Tus::new(&s.world, &token(api).await?);
    let id = new_dataset(api, dataset).await?;
    let entries: Vec<(String, Vec<u8>)> = PHOTOS.iter().map(|n| (format!("photos/{n}.png"), photo_bytes(&s.photos, n))).collect();
    let upload = tus.upload("photos.tar", &tar_of(&entries)).await?;
    let (status, v) = api.post(&format!("/api/v1/datasets/{id}/versions"), json!({"uploads": [upload]})).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "version: {status} {v}");
    let (status, added) = api.post(&format!("/api/v1/image-libraries/{library}/datasets"), json!({"dataset": id})).await?;
    anyhow::ensure!(status == StatusCode::ACCEPTED && added["added"] == PHOTOS.len(), "add: {status} {added}");
    indexed(api, library, PHOTOS.len() as u64).await?;
    Ok(id)
}

/// Waits (the indexer is another task of the portal process) until `library`'s status
/// satisfies `done`; the last status seen is in the error otherwise.
async fn library_until(api: &Api, library: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (_, all) = api.get("/api/v1/image-libraries").await?;
        let l = all.as_array().and_then(|a| a.iter().find(|l| l["library"] == library).cloned()).unwrap_or_default();
        if done(&l) {
            return Ok(l);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "library {library} never got there; last: {l}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `library` has `count` pictures indexed and nothing waiting.
async fn indexed(api: &Api, library: &str, count: u64) -> anyhow::Result<Value> {
    let l = library_until(api, library, |l| l["state"] == "failed" || (l["state"] == "done" && l["indexed"] == count && l["waiting"] == 0)).await?;
    anyhow::ensure!(l["state"] != "failed", "indexing failed: {l}");
    Ok(l)
}

async fn search(api: &Api, bytes: Vec<u8>, query: &str) -> anyhow::Result<(StatusCode, Value)> {
    api.post_bytes(&format!("/api/v1/image-search?{query}"), bytes).await
}

fn names(results: &Value) -> Vec<String> {
    results["results"].as_array().into_iter().flatten().map(|h| h["name"].as_str().unwrap_or_default().to_owned()).collect()
}

fn copies(png: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let img = image::load_from_memory(png).expect("decode");
    let encode = |i: &image::DynamicImage, f: image::ImageFormat| {
        let mut out = Cursor::new(Vec::new());
        i.to_rgb8().write_to(&mut out, f).expect("encode");
        out.into_inner()
    };
    let (w, h) = (img.width(), img.height());
    vec![
        ("mirrored", encode(&img.fliph(), image::ImageFormat::Png)),
        ("half size", encode(&img.resize_exact(w / 2, h / 2, image::imageops::FilterType::Triangle), image::ImageFormat::Png)),
        ("recompressed as JPEG", encode(&img, image::ImageFormat::Jpeg)),
        ("cropped to 85%", encode(&img.crop_imm(w * 3 / 40, h * 3 / 40, w * 17 / 20, h * 17 / 20), image::ImageFormat::Png)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_each_photo_find_it_in_the_top_5() -> anyhow::Result<()> {
    let Some(s) = setup(Backend::Sqlite).await? else { return Ok(()) };
    let result = async {
        let alice = s.world.person("researcher", "alice").await?;
        index_photos(&s, &alice, "photos", "mine").await?;
        for name in PHOTOS {
            for (how, bytes) in copies(&photo_bytes(&s.photos, name)) {
                let (status, found) = search(&alice, bytes, "library=mine&top=5").await?;
                anyhow::ensure!(status == StatusCode::OK, "{name} {how}: {status} {found}");
                anyhow::ensure!(names(&found).contains(&format!("photos/{name}.png")), "{name} ({how}) not in the top 5: {found}");
            }
        }
        // The exact picture is the first hit, scored as the same picture.
        let (_, found) = search(&alice, photo_bytes(&s.photos, "coffee"), "library=mine&top=3").await?;
        anyhow::ensure!(found["results"][0]["name"] == "photos/coffee.png" && found["results"][0]["score"].as_f64().unwrap_or(0.0) > 0.999, "{found}");
        anyhow::ensure!(found["results"][0]["sha256"] == sha_hex(&photo_bytes(&s.photos, "coffee")), "{found}");
        Ok(())
    }
    .await;
    s.world.explain(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexing_a_dataset_twice_adds_nothing() -> anyhow::Result<()> {
    let Some(s) = setup(Backend::Sqlite).await? else { return Ok(()) };
    let result = async {
        let alice = s.world.person("researcher", "alice").await?;
        let id = index_photos(&s, &alice, "photos", "mine").await?;
        let (status, again) = alice.post("/api/v1/image-libraries/mine/datasets", json!({"dataset": id, "version": 1})).await?;
        anyhow::ensure!(status == StatusCode::ACCEPTED && again["added"] == 0 && again["already_present"] == PHOTOS.len(), "{status} {again}");
        let library = indexed(&alice, "mine", PHOTOS.len() as u64).await?;
        anyhow::ensure!(library["images"] == PHOTOS.len(), "{library}");
        let (_, found) = search(&alice, photo_bytes(&s.photos, "chelsea"), "library=mine&top=100").await?;
        anyhow::ensure!(names(&found).len() == PHOTOS.len(), "every picture once: {found}");
        Ok(())
    }
    .await;
    s.world.explain(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_library_never_shows_to_another_researcher() -> anyhow::Result<()> {
    let Some(s) = setup(Backend::Postgres).await? else { return Ok(()) };
    let result = async {
        let alice = s.world.person("researcher", "alice").await?;
        let bob = s.world.person("researcher", "bob").await?;
        index_photos(&s, &alice, "photos", "mine").await?;
        let rocket = photo_bytes(&s.photos, "rocket");
        // Bob searches with alice's very picture, in every scope he may name: nothing of hers.
        for scope in ["all", "mine", "global"] {
            let (status, found) = search(&bob, rocket.clone(), &format!("library={scope}")).await?;
            anyhow::ensure!(status == StatusCode::OK && names(&found).is_empty(), "{scope}: {status} {found}");
        }
        // Nor can he name her library, fetch her picture, or remove it.
        let (status, body) = search(&bob, rocket.clone(), "library=alice").await?;
        anyhow::ensure!(status == StatusCode::BAD_REQUEST && Api::code(&body) == "INVALID_ARGUMENT", "{status} {body}");
        let sha = sha_hex(&rocket);
        let (status, _) = bob.get(&format!("/api/v1/image-libraries/mine/images/{sha}")).await?;
        anyhow::ensure!(status == StatusCode::NOT_FOUND, "bob reads alice's picture: {status}");
        let (status, _) = bob.send(reqwest::Method::DELETE, &format!("/api/v1/image-libraries/mine/images/{sha}"), None).await?;
        anyhow::ensure!(status == StatusCode::NOT_FOUND, "bob removes from his own (empty) library: {status}");
        let (_, hers) = search(&alice, rocket.clone(), "library=mine&top=1").await?;
        anyhow::ensure!(hers["results"][0]["name"] == "photos/rocket.png", "alice's library unchanged: {hers}");
        // Bob cannot contribute alice's dataset to the global library either.
        let (_, datasets) = alice.get("/api/v1/datasets").await?;
        let id = datasets[0]["dataset_id"].as_u64().unwrap_or_default();
        let (status, _) = bob.post("/api/v1/image-libraries/global/datasets", json!({"dataset": id})).await?;
        anyhow::ensure!(status == StatusCode::NOT_FOUND, "bob contributes alice's dataset: {status}");
        // Once alice contributes it to the global library, bob finds it there, and cannot remove it.
        let (status, added) = alice.post("/api/v1/image-libraries/global/datasets", json!({"dataset": id})).await?;
        anyhow::ensure!(status == StatusCode::ACCEPTED, "{status} {added}");
        indexed(&alice, "global", PHOTOS.len() as u64).await?;
        let (_, found) = search(&bob, rocket.clone(), "library=all&top=1").await?;
        anyhow::ensure!(found["results"][0]["library"] == "global" && found["results"][0]["name"] == "photos/rocket.png", "{found}");
        let (status, _) = bob.send(reqwest::Method::DELETE, &format!("/api/v1/image-libraries/global/images/{sha}"), None).await?;
        anyhow::ensure!(status == StatusCode::FORBIDDEN, "bob removes alice's contribution: {status}");
        let (_, still) = search(&bob, rocket, "library=global&top=1").await?;
        anyhow::ensure!(still["results"][0]["name"] == "photos/rocket.png", "{still}");
        Ok(())
    }
    .await;
    s.world.explain(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_picture_is_never_found_again_also_after_a_restart() -> anyhow::Result<()> {
    let Some(mut s) = setup(Backend::Sqlite).await? else { return Ok(()) };
    let result = async {
        let alice = s.world.person("researcher", "alice").await?;
        index_photos(&s, &alice, "photos", "mine").await?;
        let chelsea = photo_bytes(&s.photos, "chelsea");
        let (status, _) = alice.send(reqwest::Method::DELETE, &format!("/api/v1/image-libraries/mine/images/{}", sha_hex(&chelsea)), None).await?;
        anyhow::ensure!(status == StatusCode::NO_CONTENT, "delete: {status}");
        let (_, found) = search(&alice, chelsea.clone(), "library=mine&top=100").await?;
        anyhow::ensure!(!names(&found).contains(&"photos/chelsea.png".to_owned()) && names(&found).len() == PHOTOS.len() - 1, "{found}");
        Ok(())
    }
    .await;
    // The index was saved: a portal started again on the same folders answers the same.
    let result = match result {
        Ok(()) => {
            let url = s.embedder.get("url")?.to_owned();
            restart_portal(&mut s, url).await?;
            let alice = s.world.person_again("alice").await?;
            let after_restart = async {
                let (status, found) = search(&alice, photo_bytes(&s.photos, "chelsea"), "library=mine&top=100").await?;
                anyhow::ensure!(status == StatusCode::OK, "{status} {found}");
                anyhow::ensure!(
                    names(&found).len() == PHOTOS.len() - 1 && !names(&found).contains(&"photos/chelsea.png".to_owned()),
                    "after the restart: {found}"
                );
                Ok(())
            }
            .await;
            match after_restart {
                Ok(()) => lost_index_is_rebuilt(&mut s).await,
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    s.world.explain(result)
}

/// The index folder lost (a new disk, a database restored elsewhere): the portal indexes the
/// library again from its rows.
async fn lost_index_is_rebuilt(s: &mut Setup) -> anyhow::Result<()> {
    let url = s.embedder.get("url")?.to_owned();
    std::fs::remove_dir_all(s.world.dir.path().join("portal-datasets/search"))?;
    restart_portal(s, url).await?;
    let alice = s.world.person_again("alice").await?;
    // The first search finds no index, queues the rows again and answers what there is.
    search(&alice, photo_bytes(&s.photos, "rocket"), "library=mine").await?;
    indexed(&alice, "mine", PHOTOS.len() as u64 - 1).await?;
    let (_, found) = search(&alice, photo_bytes(&s.photos, "rocket"), "library=mine&top=1").await?;
    anyhow::ensure!(found["results"][0]["name"] == "photos/rocket.png", "after the index was lost: {found}");
    Ok(())
}

/// Stops the portal and starts it again on the same database and folders, searching with
/// the embedder at `embedder_url`.
async fn restart_portal(s: &mut Setup, embedder_url: String) -> anyhow::Result<()> {
    let endpoint = format!("http://{}", s.world.broker.address(1)?);
    let db = s.world.database_url();
    let key = s.world.dir.path().join("operator-key").display().to_string();
    let token_file = s.world.dir.path().join("embedder-token");
    std::fs::write(&token_file, EMBEDDER_TOKEN)?;
    let token_file = token_file.display().to_string();
    let extra = ["--operator-key-file", key.as_str(), "--image-embedder-url", embedder_url.as_str(), "--image-embedder-token-file", token_file.as_str()];
    let options =
        PortalOptions { smtp: Some(&s.world.smtp.address), extra: &extra, ..PortalOptions::new(&endpoint, suanli_testkit::cluster::PLATFORM_TOKEN, &db) };
    let fresh = PortalProcess::start(s.world.dir.path(), &options).await;
    // Replace only once the new one answers, so a failure still shows the old one's log.
    let old = std::mem::replace(&mut s.world.portal, fresh?);
    old.service.kill().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_that_is_not_a_usable_image_is_refused_with_the_reason() -> anyhow::Result<()> {
    let Some(s) = setup(Backend::Sqlite).await? else { return Ok(()) };
    let result = async {
        let alice = s.world.person("researcher", "alice").await?;
        index_photos(&s, &alice, "photos", "mine").await?;
        let cases: [(&str, Vec<u8>, &str, StatusCode, &str); 5] = [
            ("text", b"this is not a picture".to_vec(), "library=mine", StatusCode::BAD_REQUEST, "BAD_IMAGE"),
            ("empty", Vec::new(), "library=mine", StatusCode::BAD_REQUEST, "BAD_IMAGE"),
            ("truncated PNG", photo_bytes(&s.photos, "camera")[..2000].to_vec(), "library=mine", StatusCode::BAD_REQUEST, "BAD_IMAGE"),
            ("17 MiB", vec![0u8; 17 << 20], "library=mine", StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
            ("top 0", photo_bytes(&s.photos, "camera"), "library=mine&top=0", StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
        ];
        for (what, bytes, query, status, code) in cases {
            let (got, body) = search(&alice, bytes, query).await?;
            anyhow::ensure!(got == status && Api::code(&body) == code, "{what}: {got} {body}");
            anyhow::ensure!(!body["error"]["message"].as_str().unwrap_or_default().is_empty(), "{what}: a reason: {body}");
        }
        // Nothing changed: the library is as it was.
        indexed(&alice, "mine", PHOTOS.len() as u64).await?;
        Ok(())
    }
    .await;
    s.world.explain(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_built_with_one_model_refuses_vectors_of_another_until_rebuilt() -> anyhow::Result<()> {
    let Some(mut s) = setup(Backend::Sqlite).await? else { return Ok(()) };
    let result = async {
        let alice = s.world.person("researcher", "alice").await?;
        let id = index_photos(&s, &alice, "photos", "mine").await?;
        let (_, before) = alice.get("/api/v1/image-libraries").await?;
        let first_model = before[0]["model"].as_str().unwrap_or_default().to_owned();
        // The platform swaps the embedder for a model with other weights.
        let other = start_embedder(&s.job, s.world.dir.path(), 8).await?;
        restart_portal(&mut s, other.get("url")?.to_owned()).await?;
        let alice = s.world.person_again("alice").await?;
        // Searching the old index with the new model's vector is refused, not answered wrongly.
        let (status, found) = search(&alice, photo_bytes(&s.photos, "rocket"), "library=mine").await?;
        anyhow::ensure!(status == StatusCode::OK && names(&found).is_empty() && found["skipped"][0]["library"] == "mine", "{status} {found}");
        // New pictures for the old index are refused with the reason, and nothing is added.
        let more = new_dataset(&alice, "more").await?;
        let tus = Tus::new(&s.world, &token(&alice).await?);
        let upload = tus.upload("grey.png", &photo_bytes(&s.photos, "astronaut_half")).await?;
        let (status, v) = alice.post(&format!("/api/v1/datasets/{more}/versions"), json!({"uploads": [upload]})).await?;
        anyhow::ensure!(status == StatusCode::CREATED, "{status} {v}");
        alice.post("/api/v1/image-libraries/mine/datasets", json!({"dataset": more})).await?;
        let failed = library_until(&alice, "mine", |l| l["state"] == "failed").await?;
        anyhow::ensure!(failed["error"].as_str().unwrap_or_default().contains("rebuild") && failed["model"] == first_model.as_str(), "{failed}");
        anyhow::ensure!(failed["indexed"] == PHOTOS.len(), "{failed}");
        // Rebuilt, the library holds the new model's vectors and answers again.
        let (status, _) = alice.post("/api/v1/image-libraries/mine/rebuild", json!({})).await?;
        anyhow::ensure!(status == StatusCode::ACCEPTED, "rebuild: {status}");
        let rebuilt = indexed(&alice, "mine", PHOTOS.len() as u64 + 1).await?;
        anyhow::ensure!(rebuilt["model"] != first_model.as_str(), "{rebuilt}");
        let (_, found) = search(&alice, photo_bytes(&s.photos, "rocket"), "library=mine&top=1").await?;
        anyhow::ensure!(found["results"][0]["name"] == "photos/rocket.png" && found["skipped"].as_array().is_some_and(Vec::is_empty), "{found}");
        let _ = id;
        drop(other);
        Ok(())
    }
    .await;
    s.world.explain(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_from_a_withdrawn_share_is_no_longer_shown() -> anyhow::Result<()> {
    let Some(s) = setup(Backend::Sqlite).await? else { return Ok(()) };
    let result = async {
        let alice = s.world.person("researcher", "alice").await?;
        let bob = s.world.person("researcher", "bob").await?;
        let id = index_photos(&s, &alice, "photos", "mine").await?;
        let (status, _) = alice.send(reqwest::Method::PUT, &format!("/api/v1/datasets/{id}/shares/bob"), None).await?;
        anyhow::ensure!(status.is_success(), "share: {status}");
        let (status, added) = bob.post("/api/v1/image-libraries/mine/datasets", json!({"dataset": id})).await?;
        anyhow::ensure!(status == StatusCode::ACCEPTED, "bob adds the shared dataset: {status} {added}");
        indexed(&bob, "mine", PHOTOS.len() as u64).await?;
        let coffee = photo_bytes(&s.photos, "coffee");
        let sha = sha_hex(&coffee);
        let (_, found) = search(&bob, coffee.clone(), "library=mine&top=1").await?;
        anyhow::ensure!(found["results"][0]["name"] == "photos/coffee.png" && found["results"][0]["dataset"] == "photos", "{found}");
        let (status, _) = alice.send(reqwest::Method::DELETE, &format!("/api/v1/datasets/{id}/shares/bob"), None).await?;
        anyhow::ensure!(status.is_success(), "unshare: {status}");
        // Withdrawn: bob's library no longer shows, serves or searches by alice's pictures.
        let (_, found) = search(&bob, coffee.clone(), "library=mine").await?;
        anyhow::ensure!(names(&found).is_empty(), "after the share was withdrawn: {found}");
        let (status, _) = bob.get(&format!("/api/v1/image-libraries/mine/images/{sha}")).await?;
        anyhow::ensure!(status == StatusCode::NOT_FOUND, "bob still reads the picture: {status}");
        let (status, _) = bob.post("/api/v1/image-search/similar", json!({"from": "mine", "sha256": sha})).await?;
        anyhow::ensure!(status == StatusCode::NOT_FOUND, "bob still searches by the picture: {status}");
        // Alice's own library is untouched.
        let (_, hers) = search(&alice, coffee, "library=mine&top=1").await?;
        anyhow::ensure!(hers["results"][0]["name"] == "photos/coffee.png", "{hers}");
        Ok(())
    }
    .await;
    s.world.explain(result)
}

/// Two photos side by side in one picture: searching by all of it or by its right half.
fn side_by_side(left: &[u8], right: &[u8]) -> Vec<u8> {
    let (l, r) = (image::load_from_memory(left).expect("left").to_rgb8(), image::load_from_memory(right).expect("right").to_rgb8());
    let (l, r) = (
        image::imageops::resize(&l, 256, 256, image::imageops::FilterType::Triangle),
        image::imageops::resize(&r, 256, 256, image::imageops::FilterType::Triangle),
    );
    let mut both = image::RgbImage::new(512, 256);
    image::imageops::replace(&mut both, &l, 0, 0);
    image::imageops::replace(&mut both, &r, 256, 0);
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(both).write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

/// The first result's `data-sha256` once the results list changed from `before`.
async fn first_result(b: &suanli_testkit::webdriver::Browser, before: &str) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = b
            .execute("const li = document.querySelector('ol.results li'); return li ? li.dataset.sha256 + '|' + document.querySelector('ol.results').children.length + '|' + document.querySelector('p.took').textContent : '';", json!([]))
            .await?;
        let now = now.as_str().unwrap_or_default().to_owned();
        if !now.is_empty() && now != before {
            return Ok(now);
        }
        let error = b.execute("return document.querySelector('section.image-search .form-error').textContent", json!([])).await?;
        anyhow::ensure!(error.as_str().unwrap_or_default().is_empty(), "the page says: {error}");
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no results on the page");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_researcher_searches_by_a_cropped_picture_and_more_like_this_in_the_browser() -> anyhow::Result<()> {
    let Some(s) = setup(Backend::Sqlite).await? else { return Ok(()) };
    let result = async {
        let alice = s.world.person("researcher", "alice").await?;
        index_photos(&s, &alice, "photos", "mine").await?;
        let dir = tempfile::tempdir()?;
        let query = dir.path().join("rocket-and-camera.png");
        std::fs::write(&query, side_by_side(&photo_bytes(&s.photos, "rocket"), &photo_bytes(&s.photos, "camera")))?;
        let (rocket, camera) = (sha_hex(&photo_bytes(&s.photos, "rocket")), sha_hex(&photo_bytes(&s.photos, "camera")));

        let b = suanli_testkit::webdriver::Browser::start().await?;
        let url = &s.world.portal.url;
        b.goto(&format!("{url}/login")).await?;
        b.type_into("input[name=login]", "alice").await?;
        b.type_into("input[name=password]", support::PASSWORD).await?;
        b.click("form.api button[type=submit]").await?;
        b.wait_for("button[data-logout]", Duration::from_secs(30)).await?;
        b.goto(&format!("{url}/search")).await?;
        // The library's status: indexed, with its model.
        b.wait_for("tr[data-library=mine][data-state=done]", Duration::from_secs(30)).await?;
        let indexed = b.wait_text("tr[data-library=mine] td.indexed", Duration::from_secs(5)).await?;
        anyhow::ensure!(indexed == format!("{0} / {0}", PHOTOS.len()), "indexed: {indexed}");

        // The whole picture, then only its right half, dragged out on the canvas.
        b.type_into("section.image-search input[name=image]", &query.display().to_string()).await?;
        b.wait_for("canvas.crop:not([hidden])", Duration::from_secs(10)).await?;
        b.select("section.image-search select[name=library]", "mine").await?;
        b.click("section.image-search form.query button[type=submit]").await?;
        let whole = first_result(&b, "").await?;
        anyhow::ensure!(whole.starts_with(&rocket) || whole.starts_with(&camera), "the whole picture finds one of its two photos: {whole}");
        b.execute(
            "const c = document.querySelector('canvas.crop'); const r = c.getBoundingClientRect();
             const at = (type, fx, fy) => c.dispatchEvent(new PointerEvent(type, {bubbles: true, clientX: r.left + r.width * fx, clientY: r.top + r.height * fy}));
             at('pointerdown', 0.52, 0.02); at('pointermove', 0.8, 0.5); at('pointermove', 0.98, 0.98); at('pointerup', 0.98, 0.98);",
            json!([]),
        )
        .await?;
        b.click("section.image-search form.query button[type=submit]").await?;
        let cropped = first_result(&b, &whole).await?;
        anyhow::ensure!(cropped.starts_with(&camera), "the right half is the camera man: {cropped}");
        b.screenshot(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("portal-screenshots/image-search.png")).await?;

        // More like this, from the first result: the camera man himself comes first, scored 1.
        b.click("ol.results li:first-child button").await?;
        let similar = first_result(&b, &cropped).await?;
        anyhow::ensure!(similar.starts_with(&camera), "{similar}");
        let score = b.wait_text("ol.results li:first-child span", Duration::from_secs(5)).await?;
        anyhow::ensure!(score.starts_with("1.000") || score.starts_with("0.99"), "{score}");
        Ok(())
    }
    .await;
    s.world.explain(result)
}
