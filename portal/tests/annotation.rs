//! Crowdsourced annotation through the portal's REST API against a real portal process
//! (SQLite and PostgreSQL): tasks pulled by many annotators at once never share a slot, a
//! lease that runs out returns its slot and locks out its old holder, saves are revisioned and
//! a retry applies once, bad shapes are refused with the reason, overlapping work becomes
//! agreement and a conflict a reviewer settles, honeypots score annotators, and the export
//! holds exactly what was drawn. Strangers and annotators try what they may not.

mod support;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{new_dataset, tar_of, token, Api, Backend, Tus, World};

fn png(width: u32, height: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([shade, (x * 3) as u8, (y * 2) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

const SCHEMA: &str = r##"{"classes": [{"name": "cat", "colour": "#e6194b", "attributes": [{"name": "occluded", "kind": "checkbox"}]}, {"name": "dog", "colour": "#3cb44b"}], "kinds": ["box", "polygon", "points"]}"##;

/// A dataset of `images` pictures (`img0.png`…, 120×80) whose `img0.png` has a known cat box
/// (from a COCO file that came with them): the honeypot when a project asks for one.
async fn dataset(w: &World, owner: &Api, name: &str, images: u8) -> anyhow::Result<u64> {
    let mut entries: Vec<(String, Vec<u8>)> = (0..images).map(|i| (format!("img{i}.png"), png(120, 80, i * 20))).collect();
    let coco = json!({
        "images": [{"id": 1, "file_name": "img0.png", "width": 120, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30]}],
        "categories": [{"id": 1, "name": "cat"}]
    });
    entries.push(("annotations.json".into(), serde_json::to_vec(&coco)?));
    let id = new_dataset(owner, name).await?;
    let upload = Tus::new(w, &token(owner).await?).upload(&format!("{name}.tar"), &tar_of(&entries)).await?;
    let (status, body) = owner.post(&format!("/api/v1/datasets/{id}/versions"), json!({"uploads": [upload], "labels": "none"})).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "version: {status} {body}");
    Ok(id)
}

async fn project(owner: &Api, body: Value) -> anyhow::Result<Value> {
    let (status, made) = owner.post("/api/v1/annotation-projects", body).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "create project: {status} {made}");
    Ok(made)
}

async fn invite(owner: &Api, project: u64, username: &str, role: &str) -> anyhow::Result<()> {
    let (status, body) =
        owner.send(reqwest::Method::PUT, &format!("/api/v1/annotation-projects/{project}/members/{username}"), Some(json!({"role": role}))).await?;
    anyhow::ensure!(status == StatusCode::NO_CONTENT, "invite {username}: {status} {body}");
    Ok(())
}

async fn pull(api: &Api, project: u64) -> anyhow::Result<(StatusCode, Value)> {
    api.post(&format!("/api/v1/annotation-projects/{project}/next"), json!({})).await
}

fn slot_path(project: u64, slot: &Value) -> String {
    format!("/api/v1/annotation-projects/{project}/tasks/{}/slots/{}", slot["task"], slot["slot"])
}

/// Saves the image at `position` (1-based) of the slot's task.
async fn save(api: &Api, project: u64, slot: &Value, position: u64, shapes: Value, revision: u64) -> anyhow::Result<(StatusCode, Value)> {
    api.send(
        reqwest::Method::PUT,
        &format!("{}/images/{position}", slot_path(project, slot)),
        Some(json!({"shapes": shapes, "revision": revision, "active_ms": 1500})),
    )
    .await
}

/// Which picture (`img<i>.png` of [`dataset`]) each place of a slot's task shows: the API tells
/// annotators positions only (a honeypot must not stand out by its name or number), so the test
/// recognises the pictures by their bytes, as a person would by looking.
async fn pictures(api: &Api, project: u64, slot: &Value) -> anyhow::Result<Vec<(u64, String)>> {
    let mut out = Vec::new();
    for image in slot["images"].as_array().cloned().unwrap_or_default() {
        anyhow::ensure!(image.get("name").is_none() && image.get("image_no").is_none(), "an annotator sees no name or number: {image}");
        let position = image["position"].as_u64().unwrap_or_default();
        let bytes = api.get_bytes(&format!("{}/images/{position}/file", slot_path(project, slot))).await?;
        let shade = (0..10u8).find(|i| png(120, 80, i * 20) == bytes).ok_or_else(|| anyhow::anyhow!("position {position} shows no picture of the dataset"))?;
        out.push((position, format!("img{shade}.png")));
    }
    Ok(out)
}

fn cat_box(id: &str, x: f64) -> Value {
    json!({"id": id, "label": "cat", "type": "box", "x": x, "y": 10, "w": 40, "h": 30})
}

async fn run(backend: Backend, scenario: for<'a> fn(&'a World) -> futures::future::BoxFuture<'a, anyhow::Result<()>>) -> anyhow::Result<()> {
    let Some(w) = World::start(backend).await? else { return Ok(()) };
    w.explain(tokio::time::timeout(Duration::from_secs(240), scenario(&w)).await.map_err(|_| anyhow::anyhow!("timed out")).and_then(|r| r))
}

/// Six annotators pull at once from four slots (two tasks, two annotators each): four get a
/// slot each, all different, nobody two of one task; the other two are told nothing is left.
/// Pulling again returns the slot one holds.
async fn concurrent_pulls_never_share_a_slot(w: &World) -> anyhow::Result<()> {
    let owner = w.person("researcher", "olga").await?;
    let d = dataset(w, &owner, "pets", 4).await?;
    let p = project(&owner, json!({"name": "pets", "dataset": d, "schema": serde_json::from_str::<Value>(SCHEMA)?, "task_size": 2, "overlap": 2})).await?;
    let id = p["id"].as_u64().unwrap_or_default();
    anyhow::ensure!(p["tasks"] == 2 && p["slots_total"] == 4 && p["images"] == 4, "the plan: {p}");
    let mut crowd = Vec::new();
    for i in 0..6 {
        let name = format!("ann{i}");
        let api = w.person("researcher", &name).await?;
        invite(&owner, id, &name, "annotator").await?;
        crowd.push(api);
    }
    let answers = futures::future::join_all(crowd.iter().map(|a| pull(a, id))).await;
    let mut taken = Vec::new();
    let mut refused = 0;
    for answer in answers {
        match answer? {
            (StatusCode::OK, slot) => taken.push((slot["task"].as_u64(), slot["slot"].as_u64())),
            (StatusCode::NOT_FOUND, body) if Api::code(&body) == "NOT_FOUND" => refused += 1,
            (status, body) => anyhow::bail!("pull: {status} {body}"),
        }
    }
    let mut distinct = taken.clone();
    distinct.sort();
    distinct.dedup();
    anyhow::ensure!(taken.len() == 4 && distinct.len() == 4 && refused == 2, "slots taken {taken:?}, refused {refused}");
    // Again: the same slot, not a second one.
    for a in &crowd {
        if let (StatusCode::OK, again) = pull(a, id).await? {
            let mine: Vec<Value> = a.get(&format!("/api/v1/annotation-projects/{id}/my-slots")).await?.1.as_array().cloned().unwrap_or_default();
            anyhow::ensure!(mine.len() == 1 && mine[0]["task"] == again["task"] && mine[0]["slot"] == again["slot"], "one slot each: {mine:?} {again}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn concurrent_pulls_never_share_a_slot_on_sqlite() -> anyhow::Result<()> {
    run(Backend::Sqlite, |w| Box::pin(concurrent_pulls_never_share_a_slot(w))).await
}

#[tokio::test]
async fn concurrent_pulls_never_share_a_slot_on_postgres() -> anyhow::Result<()> {
    run(Backend::Postgres, |w| Box::pin(concurrent_pulls_never_share_a_slot(w))).await
}

/// A slot whose lease runs out goes to the next annotator who pulls; its old holder's save is
/// then refused and changes nothing.
async fn an_expired_lease_returns_the_slot(w: &World) -> anyhow::Result<()> {
    let owner = w.person("researcher", "olga").await?;
    let d = dataset(w, &owner, "pets", 2).await?;
    let p = project(
        &owner,
        json!({"name": "pets", "dataset": d, "schema": serde_json::from_str::<Value>(SCHEMA)?, "task_size": 2, "overlap": 1, "lease_seconds": 5}),
    )
    .await?;
    let id = p["id"].as_u64().unwrap_or_default();
    let (ann, bob) = (w.person("researcher", "ann").await?, w.person("researcher", "bob").await?);
    invite(&owner, id, "ann", "annotator").await?;
    invite(&owner, id, "bob", "annotator").await?;
    let (status, slot) = pull(&ann, id).await?;
    anyhow::ensure!(status == StatusCode::OK, "ann pulls: {status} {slot}");
    let (status, saved) = save(&ann, id, &slot, 1, json!([cat_box("a", 10.0)]), 0).await?;
    anyhow::ensure!(status == StatusCode::OK && saved["revision"] == 1, "ann saves: {status} {saved}");
    let (status, body) = pull(&bob, id).await?;
    anyhow::ensure!(status == StatusCode::NOT_FOUND, "while ann's lease runs, bob gets nothing: {status} {body}");
    // Bob asks until the lease has run out (5 s after ann's save).
    let started = Instant::now();
    let taken = loop {
        let (status, body) = pull(&bob, id).await?;
        if status == StatusCode::OK {
            break body;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "the slot never came back: {status} {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    anyhow::ensure!(taken["task"] == slot["task"] && taken["slot"] == slot["slot"], "bob has ann's slot: {taken}");
    anyhow::ensure!(taken["images"][0]["shapes"].as_array().is_some_and(|s| s.is_empty()), "bob starts clean: {taken}");
    let (status, body) = save(&ann, id, &slot, 1, json!([cat_box("a", 20.0)]), 1).await?;
    anyhow::ensure!(status == StatusCode::CONFLICT && Api::code(&body) == "TASK_NOT_HELD", "ann's late save: {status} {body}");
    let (status, body) = ann.post(&format!("{}/submit", slot_path(id, &slot)), json!({})).await?;
    anyhow::ensure!(status == StatusCode::CONFLICT && Api::code(&body) == "TASK_NOT_HELD", "ann's late submit: {status} {body}");
    let (_, mine) = bob.get(&slot_path(id, &taken)).await?;
    anyhow::ensure!(mine["images"][0]["revision"] == 0, "nothing of ann's reached bob's slot: {mine}");
    Ok(())
}

#[tokio::test]
async fn an_expired_lease_returns_the_slot_on_sqlite() -> anyhow::Result<()> {
    run(Backend::Sqlite, |w| Box::pin(an_expired_lease_returns_the_slot(w))).await
}

#[tokio::test]
async fn an_expired_lease_returns_the_slot_on_postgres() -> anyhow::Result<()> {
    run(Backend::Postgres, |w| Box::pin(an_expired_lease_returns_the_slot(w))).await
}

/// A self-intersecting polygon, a box past the image's edge, an unknown class: each refused
/// with its index and reason, and nothing is saved. A retried save gets its first answer; a
/// save based on an old revision is refused.
async fn bad_shapes_and_stale_saves_are_refused(w: &World) -> anyhow::Result<()> {
    let owner = w.person("researcher", "olga").await?;
    let d = dataset(w, &owner, "pets", 2).await?;
    let p = project(&owner, json!({"name": "pets", "dataset": d, "schema": serde_json::from_str::<Value>(SCHEMA)?, "task_size": 2, "overlap": 1})).await?;
    let id = p["id"].as_u64().unwrap_or_default();
    let ann = w.person("researcher", "ann").await?;
    invite(&owner, id, "ann", "annotator").await?;
    let (_, slot) = pull(&ann, id).await?;
    let bow_tie = json!({"id": "p", "label": "cat", "type": "polygon", "points": [[0, 0], [50, 50], [50, 0], [0, 50]]});
    let outside = json!({"id": "b", "label": "cat", "type": "box", "x": 100, "y": 10, "w": 40, "h": 30});
    let unknown = json!({"id": "u", "label": "horse", "type": "box", "x": 1, "y": 1, "w": 4, "h": 4});
    for (shapes, index, why) in [
        (json!([cat_box("ok", 1.0), bow_tie]), 1, "crosses itself"),
        (json!([outside]), 0, "outside the 120×80 image"),
        (json!([unknown]), 0, "not a class"),
        (json!([{"id": "x", "label": "cat", "type": "box", "x": 1, "y": 1, "w": 4}]), usize::MAX, "missing field"),
    ] {
        let (status, body) = save(&ann, id, &slot, 1, shapes, 0).await?;
        let field = if index == usize::MAX { "body".to_owned() } else { format!("shapes[{index}]") };
        anyhow::ensure!(
            status == StatusCode::BAD_REQUEST && support::fields(&body).contains(&field) && body.to_string().contains(why),
            "{why}: {status} {body}"
        );
    }
    let (_, view) = ann.get(&slot_path(id, &slot)).await?;
    anyhow::ensure!(view["images"][0]["revision"] == 0 && view["images"][0]["shapes"] == json!([]), "nothing saved: {view}");

    let shapes = json!([cat_box("a", 10.0)]);
    let first = save(&ann, id, &slot, 1, shapes.clone(), 0).await?;
    let retry = save(&ann, id, &slot, 1, shapes.clone(), 0).await?;
    anyhow::ensure!(
        first.0 == StatusCode::OK && retry.0 == StatusCode::OK && first.1["revision"] == 1 && retry.1["revision"] == 1,
        "retry: {first:?} {retry:?}"
    );
    let (status, body) = save(&ann, id, &slot, 1, json!([cat_box("b", 30.0)]), 0).await?;
    anyhow::ensure!(status == StatusCode::CONFLICT && Api::code(&body) == "STALE_REVISION", "an old tab's save: {status} {body}");
    let (_, view) = ann.get(&slot_path(id, &slot)).await?;
    anyhow::ensure!(view["images"][0]["revision"] == 1 && view["images"][0]["shapes"][0]["id"] == "a", "the first save stands: {view}");
    Ok(())
}

#[tokio::test]
async fn bad_shapes_and_stale_saves_are_refused_on_sqlite() -> anyhow::Result<()> {
    run(Backend::Sqlite, |w| Box::pin(bad_shapes_and_stale_saves_are_refused(w))).await
}

#[tokio::test]
async fn bad_shapes_and_stale_saves_are_refused_on_postgres() -> anyhow::Result<()> {
    run(Backend::Postgres, |w| Box::pin(bad_shapes_and_stale_saves_are_refused(w))).await
}

/// Two annotators over one task of two images and a honeypot: they agree on one image and one
/// leaves a dog out on the other; the conflict is listed for the reviewer, who accepts the
/// dog; the honeypot scores each; the export holds exactly the reviewed shapes and becomes the
/// dataset's next version.
async fn overlap_review_and_export(w: &World) -> anyhow::Result<()> {
    let owner = w.person("researcher", "olga").await?;
    let d = dataset(w, &owner, "pets", 3).await?;
    let p = project(
        &owner,
        json!({"name": "pets", "dataset": d, "schema": serde_json::from_str::<Value>(SCHEMA)?, "task_size": 2, "overlap": 2, "honeypots": ["img0.png"], "honeypots_per_task": 1}),
    )
    .await?;
    let id = p["id"].as_u64().unwrap_or_default();
    anyhow::ensure!(p["tasks"] == 1, "two images and the honeypot in one task: {p}");
    let (ann, bob, rita) = (w.person("researcher", "ann").await?, w.person("researcher", "bob").await?, w.person("researcher", "rita").await?);
    invite(&owner, id, "ann", "annotator").await?;
    invite(&owner, id, "bob", "annotator").await?;
    invite(&owner, id, "rita", "reviewer").await?;
    let (_, a_slot) = pull(&ann, id).await?;
    let (_, b_slot) = pull(&bob, id).await?;
    let images = pictures(&ann, id, &a_slot).await?;
    anyhow::ensure!(images.len() == 3 && images.iter().map(|(p, _)| *p).eq(1..=3), "three images at places 1 to 3: {images:?}");
    anyhow::ensure!(pictures(&bob, id, &b_slot).await? == images, "the same order for both annotators");
    let dog = json!({"id": "d", "label": "dog", "type": "polygon", "points": [[70, 40], [110, 40], [110, 75], [70, 75]]});
    for (position, name) in &images {
        let (a_shapes, b_shapes) = match name.as_str() {
            // The honeypot: ann finds the known cat, bob calls it a dog.
            "img0.png" => (json!([cat_box("h", 10.0)]), json!([{"id": "h", "label": "dog", "type": "box", "x": 10, "y": 10, "w": 40, "h": 30}])),
            "img1.png" => (json!([cat_box("c", 10.0)]), json!([cat_box("c", 11.0)])),
            _ => (json!([cat_box("c", 5.0), dog.clone()]), json!([cat_box("c", 5.0)])),
        };
        anyhow::ensure!(save(&ann, id, &a_slot, *position, a_shapes, 0).await?.0 == StatusCode::OK, "ann saves {name}");
        anyhow::ensure!(save(&bob, id, &b_slot, *position, b_shapes, 0).await?.0 == StatusCode::OK, "bob saves {name}");
    }
    // Nothing to review before every annotator submitted.
    let (_, listed) = rita.get(&format!("/api/v1/annotation-projects/{id}/conflicts")).await?;
    anyhow::ensure!(listed == json!([]), "no conflicts yet: {listed}");
    for (api, slot) in [(&ann, &a_slot), (&bob, &b_slot)] {
        let (status, body) = api.post(&format!("{}/submit", slot_path(id, slot)), json!({})).await?;
        anyhow::ensure!(status == StatusCode::NO_CONTENT, "submit: {status} {body}");
    }
    let (status, body) = save(&ann, id, &a_slot, images[0].0, json!([]), 1).await?;
    anyhow::ensure!(status == StatusCode::CONFLICT, "a submitted task no longer changes: {status} {body}");

    // As if the portal had stopped after the last submit, before the comparison was recorded:
    // the reviewers' list compares the task first.
    let db = suanli_portal::db::Db::connect(&w.database_url()).await?;
    sqlx::query("DELETE FROM annotation_results").execute(&db.pool).await?;
    sqlx::query("UPDATE annotation_tasks SET compared_ms = NULL").execute(&db.pool).await?;
    let (_, listed) = rita.get(&format!("/api/v1/annotation-projects/{id}/conflicts")).await?;
    let conflicts = listed.as_array().cloned().unwrap_or_default();
    anyhow::ensure!(conflicts.len() == 1 && conflicts[0]["name"] == "img2.png", "one image in conflict: {listed}");
    let conflict = &conflicts[0]["conflicts"][0];
    anyhow::ensure!(conflict["missing"] == json!(["bob"]) && conflict["shapes"][0]["annotator"] == "ann", "bob left the dog out: {conflict}");
    let (status, body) = rita.get(&format!("/api/v1/annotation-projects/{id}/export?format=coco")).await?;
    anyhow::ensure!(status == StatusCode::CONFLICT, "no export while a conflict is undecided: {status} {body}");
    let image_no = conflicts[0]["image_no"].as_u64().unwrap_or_default();
    let decisions = format!("/api/v1/annotation-projects/{id}/images/{image_no}/decisions");
    let (status, body) = rita.post(&decisions, json!({"key": conflict["key"], "decision": {"decision": "accept", "annotator": "bob", "shape": "c"}})).await?;
    anyhow::ensure!(status == StatusCode::BAD_REQUEST, "accepting a shape from outside the conflict: {status} {body}");
    let (status, body) = ann.post(&decisions, json!({"key": conflict["key"], "decision": {"decision": "reject"}})).await?;
    anyhow::ensure!(status == StatusCode::FORBIDDEN, "an annotator does not review: {status} {body}");
    let (status, body) = rita.post(&decisions, json!({"key": conflict["key"], "decision": {"decision": "accept", "annotator": "ann", "shape": "d"}})).await?;
    anyhow::ensure!(status == StatusCode::OK, "rita accepts the dog: {status} {body}");

    let (status, board) = owner.get(&format!("/api/v1/annotation-projects/{id}/dashboard")).await?;
    anyhow::ensure!(
        status == StatusCode::OK && board["images_complete"] == 2 && board["undecided"] == 0 && board["conflicts"] == 1,
        "dashboard: {status} {board}"
    );
    anyhow::ensure!(board["labels"] == json!({"cat": 2, "dog": 1}), "labels: {board}");
    let stats = |who: &str| board["annotators"].as_array().and_then(|a| a.iter().find(|s| s["username"] == who).cloned()).unwrap_or_default();
    anyhow::ensure!(stats("ann")["honeypot_score"] == 1.0 && stats("bob")["honeypot_score"] == 0.0, "honeypots: {board}");
    anyhow::ensure!(stats("ann")["images_submitted"] == 3 && stats("ann")["active_ms"].as_i64().is_some_and(|ms| ms > 0), "time and work: {board}");

    let (status, coco) = owner.get(&format!("/api/v1/annotation-projects/{id}/export?format=coco")).await?;
    anyhow::ensure!(status == StatusCode::OK, "export: {status} {coco}");
    let set = suanli_cv::annotation::coco::read(&serde_json::to_vec(&coco)?)?;
    let of = |name: &str| set.images.iter().find(|i| i.file_name == name).map(|i| i.objects.clone()).unwrap_or_default();
    anyhow::ensure!(set.images.len() == 2 && of("img0.png").is_empty(), "the honeypot is not exported: {coco}");
    let cat_at = |objects: &[suanli_cv::annotation::Object], x: f32| {
        objects.iter().any(|o| o.category == "cat" && o.shape == suanli_cv::annotation::Shape::Box { x, y: 10.0, w: 40.0, h: 30.0 })
    };
    anyhow::ensure!(
        of("img1.png").len() == 1 && (cat_at(&of("img1.png"), 10.0) || cat_at(&of("img1.png"), 11.0)),
        "img1: one of the two agreeing cats: {coco}"
    );
    let img2 = of("img2.png");
    let dog_polygon = suanli_cv::annotation::Shape::Polygon { points: vec![(70.0, 40.0), (110.0, 40.0), (110.0, 75.0), (70.0, 75.0)] };
    anyhow::ensure!(
        img2.len() == 2 && cat_at(&img2, 5.0) && img2.iter().any(|o| o.category == "dog" && o.shape == dog_polygon),
        "img2: the cat and the accepted dog: {coco}"
    );

    let (status, version) = owner.post(&format!("/api/v1/annotation-projects/{id}/export-version"), json!({"request_id": "review-1"})).await?;
    anyhow::ensure!(status == StatusCode::CREATED && version["version"] == 2, "a new version: {status} {version}");
    let (status, again) = owner.post(&format!("/api/v1/annotation-projects/{id}/export-version"), json!({"request_id": "review-1"})).await?;
    anyhow::ensure!(status == StatusCode::OK && again["version"] == 2, "the retry gets the same version: {status} {again}");
    let (_, v2) = owner.get(&format!("/api/v1/datasets/{d}/versions/2")).await?;
    let files = v2["files"].as_array().cloned().unwrap_or_default();
    let objects = |name: &str| files.iter().find(|f| f["name"] == name).map(|f| f["objects"].as_array().map_or(0, |o| o.len())).unwrap_or(usize::MAX);
    anyhow::ensure!(objects("img2.png") == 2 && objects("img0.png") == 1, "the version carries the reviewed labels and keeps the honeypot's: {v2}");
    Ok(())
}

#[tokio::test]
async fn overlap_review_and_export_on_sqlite() -> anyhow::Result<()> {
    run(Backend::Sqlite, |w| Box::pin(overlap_review_and_export(w))).await
}

#[tokio::test]
async fn overlap_review_and_export_on_postgres() -> anyhow::Result<()> {
    run(Backend::Postgres, |w| Box::pin(overlap_review_and_export(w))).await
}

/// A stranger does not see a project; an annotator cannot review, export, invite, fetch an
/// image outside their tasks, or write into another's slot; nothing of theirs changes.
async fn strangers_and_annotators_stay_in_their_lane(w: &World) -> anyhow::Result<()> {
    let owner = w.person("researcher", "olga").await?;
    let d = dataset(w, &owner, "pets", 4).await?;
    let p = project(&owner, json!({"name": "pets", "dataset": d, "schema": serde_json::from_str::<Value>(SCHEMA)?, "task_size": 2, "overlap": 1})).await?;
    let id = p["id"].as_u64().unwrap_or_default();
    let (ann, bob, eve) = (w.person("researcher", "ann").await?, w.person("researcher", "bob").await?, w.person("researcher", "eve").await?);
    invite(&owner, id, "ann", "annotator").await?;
    invite(&owner, id, "bob", "annotator").await?;
    let (_, a_slot) = pull(&ann, id).await?;
    let (_, b_slot) = pull(&bob, id).await?;
    anyhow::ensure!(save(&bob, id, &b_slot, 1, json!([cat_box("b", 10.0)]), 0).await?.0 == StatusCode::OK, "bob saves");

    let base = format!("/api/v1/annotation-projects/{id}");
    for path in [base.clone(), format!("{base}/dashboard"), format!("{base}/conflicts"), format!("{base}/images/0/file")] {
        let (status, body) = eve.get(&path).await?;
        anyhow::ensure!(status == StatusCode::NOT_FOUND, "a stranger at {path}: {status} {body}");
    }
    let (status, body) = eve.post(&format!("{base}/join"), json!({})).await?;
    anyhow::ensure!(status == StatusCode::NOT_FOUND, "a stranger cannot join an invitation-only project: {status} {body}");
    let (_, list) = eve.get("/api/v1/annotation-projects").await?;
    anyhow::ensure!(list == json!([]), "nor list it: {list}");

    for path in [format!("{base}/dashboard"), format!("{base}/conflicts"), format!("{base}/export?format=coco")] {
        let (status, body) = ann.get(&path).await?;
        anyhow::ensure!(status == StatusCode::FORBIDDEN, "an annotator at {path}: {status} {body}");
    }
    let (status, body) = ann.send(reqwest::Method::PUT, &format!("{base}/members/eve"), Some(json!({"role": "reviewer"}))).await?;
    anyhow::ensure!(status == StatusCode::FORBIDDEN, "an annotator invites: {status} {body}");
    let (status, body) = ann.get(&format!("{}/images/1/file", slot_path(id, &b_slot))).await?;
    anyhow::ensure!(status == StatusCode::CONFLICT && Api::code(&body) == "TASK_NOT_HELD", "ann fetches an image of bob's task: {status} {body}");
    for n in 0..4 {
        let (status, body) = ann.get(&format!("{base}/images/{n}/file")).await?;
        anyhow::ensure!(status == StatusCode::FORBIDDEN, "ann fetches image {n} by its number (owner and reviewers only): {status} {body}");
    }
    let (status, _) = ann.get(&format!("{}/images/1/file", slot_path(id, &a_slot))).await?;
    anyhow::ensure!(status == StatusCode::OK, "ann fetches her own task's image");
    let (status, body) = ann.get(&format!("{}/images/3/file", slot_path(id, &a_slot))).await?;
    anyhow::ensure!(status == StatusCode::NOT_FOUND, "a place past the task's end: {status} {body}");
    let (status, body) = save(&ann, id, &b_slot, 1, json!([]), 1).await?;
    anyhow::ensure!(status == StatusCode::CONFLICT && Api::code(&body) == "TASK_NOT_HELD", "ann writes into bob's slot: {status} {body}");
    let (status, body) = ann.get(&slot_path(id, &b_slot)).await?;
    anyhow::ensure!(status == StatusCode::CONFLICT, "ann reads bob's slot: {status} {body}");
    let (status, body) = ann.post(&format!("{}/release", slot_path(id, &b_slot)), json!({})).await?;
    anyhow::ensure!(status == StatusCode::CONFLICT, "ann releases bob's slot: {status} {body}");
    let (_, view) = bob.get(&slot_path(id, &b_slot)).await?;
    anyhow::ensure!(view["state"] == "held" && view["images"][0]["revision"] == 1 && view["images"][0]["shapes"][0]["id"] == "b", "bob's work stands: {view}");
    Ok(())
}

#[tokio::test]
async fn strangers_and_annotators_stay_in_their_lane_on_sqlite() -> anyhow::Result<()> {
    run(Backend::Sqlite, |w| Box::pin(strangers_and_annotators_stay_in_their_lane(w))).await
}

#[tokio::test]
async fn strangers_and_annotators_stay_in_their_lane_on_postgres() -> anyhow::Result<()> {
    run(Backend::Postgres, |w| Box::pin(strangers_and_annotators_stay_in_their_lane(w))).await
}

/// An open call lets any researcher join and pull; the owner pushes a slot to a named
/// annotator; the version's own (model) objects show as pre-annotations (never with honeypots,
/// which would be the images without any); VOC and YOLO exports hold the reviewed shapes.
async fn open_calls_pushes_pre_annotations_and_exports(w: &World) -> anyhow::Result<()> {
    let owner = w.person("researcher", "olga").await?;
    // The pictures of [`dataset`] (so that [`pictures`] knows them), with labels of their own.
    let mut entries: Vec<(String, Vec<u8>)> = (0..3u8).map(|i| (format!("img{i}.png"), png(120, 80, i * 20))).collect();
    let coco = json!({
        "images": [{"id": 1, "file_name": "img0.png", "width": 120, "height": 80}, {"id": 2, "file_name": "img1.png", "width": 120, "height": 80}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [20, 20, 30, 30], "score": 0.9},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [60, 10, 20, 20], "score": 0.4}
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "horse"}]
    });
    entries.push(("annotations.json".into(), serde_json::to_vec(&coco)?));
    let d = new_dataset(&owner, "pets").await?;
    let upload = Tus::new(w, &token(&owner).await?).upload("pets.tar", &tar_of(&entries)).await?;
    let (status, body) = owner.post(&format!("/api/v1/datasets/{d}/versions"), json!({"uploads": [upload], "labels": "none"})).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "version: {status} {body}");
    let refused = json!({"name": "pets", "dataset": d, "schema": serde_json::from_str::<Value>(SCHEMA)?, "task_size": 1, "overlap": 1,
        "pre_annotations": true, "honeypots": ["img0.png"], "honeypots_per_task": 1});
    let (status, body) = owner.post("/api/v1/annotation-projects", refused).await?;
    anyhow::ensure!(
        status == StatusCode::BAD_REQUEST && support::fields(&body) == ["pre_annotations"],
        "pre-annotations would give honeypots away: {status} {body}"
    );
    let p = project(
        &owner,
        json!({"name": "pets", "dataset": d, "schema": serde_json::from_str::<Value>(SCHEMA)?, "task_size": 1, "overlap": 1, "open_call": true, "pre_annotations": true}),
    )
    .await?;
    let id = p["id"].as_u64().unwrap_or_default();
    anyhow::ensure!(p["tasks"] == 3, "a task an image: {p}");

    let eve = w.person("researcher", "eve").await?;
    let (_, list) = eve.get("/api/v1/annotation-projects").await?;
    anyhow::ensure!(list[0]["id"] == id && list[0]["role"] == Value::Null, "an open call is listed: {list}");
    let (status, body) = pull(&eve, id).await?;
    anyhow::ensure!(status == StatusCode::FORBIDDEN, "pulling before joining: {status} {body}");
    let (status, joined) = eve.post(&format!("/api/v1/annotation-projects/{id}/join"), json!({})).await?;
    anyhow::ensure!(status == StatusCode::OK && joined["role"] == "annotator", "join: {status} {joined}");

    // The owner pushes the task of img2 to eve's colleague; eve pulls the other.
    let zed = w.person("researcher", "zed").await?;
    invite(&owner, id, "zed", "annotator").await?;
    let (status, body) = owner.post(&format!("/api/v1/annotation-projects/{id}/tasks/1/slots/0/assign"), json!({"username": "zed"})).await?;
    anyhow::ensure!(status == StatusCode::NO_CONTENT, "push: {status} {body}");
    let (status, body) = owner.post(&format!("/api/v1/annotation-projects/{id}/tasks/1/slots/0/assign"), json!({"username": "eve"})).await?;
    anyhow::ensure!(status == StatusCode::CONFLICT, "a held slot is not pushed again: {status} {body}");
    let (status, body) = eve.post(&format!("/api/v1/annotation-projects/{id}/tasks/0/slots/0/assign"), json!({"username": "eve"})).await?;
    anyhow::ensure!(status == StatusCode::FORBIDDEN, "an annotator does not push: {status} {body}");
    let (status, body) = owner.post(&format!("/api/v1/annotation-projects/{id}/tasks/2/slots/0/assign"), json!({"username": "eve"})).await?;
    anyhow::ensure!(status == StatusCode::NO_CONTENT, "push to eve: {status} {body}");
    let (_, zeds) = pull(&zed, id).await?;
    anyhow::ensure!(zeds["task"] == 1, "zed's pull returns the pushed slot: {zeds}");
    let (_, eves) = pull(&eve, id).await?;
    anyhow::ensure!(eves["task"] == 2, "and eve's hers: {eves}");

    // Pre-annotations: img1's cat (the horse is not a class of the schema).
    let mut named = Vec::new();
    for (api, slot) in [(&eve, &eves), (&zed, &zeds)] {
        let images = slot["images"].as_array().cloned().unwrap_or_default();
        for (position, name) in pictures(api, id, slot).await? {
            named.push((name, images[position as usize - 1].clone()));
        }
    }
    let img1 = named.iter().find(|(name, _)| name == "img1.png").map(|(_, i)| i.clone()).unwrap_or_default();
    anyhow::ensure!(
        img1["pre"].as_array().map(Vec::len) == Some(1) && img1["pre"][0]["label"] == "cat" && img1["pre"][0]["score"] == 0.9,
        "img1's pre-annotation: {img1}"
    );

    // Each accepts what they see (the cat without its score), draws on img2, and submits.
    for (api, slot) in [(&eve, &eves), (&zed, &zeds)] {
        for (position, name) in pictures(api, id, slot).await? {
            let shapes = match name.as_str() {
                "img1.png" => json!([{"id": "c", "label": "cat", "type": "box", "x": 20, "y": 20, "w": 30, "h": 30}]),
                "img2.png" => json!([{"id": "d", "label": "dog", "type": "polygon", "points": [[70, 40], [110, 40], [110, 75]]}]),
                _ => json!([cat_box("h", 10.0)]),
            };
            let (status, body) = save(api, id, slot, position, shapes, 0).await?;
            anyhow::ensure!(status == StatusCode::OK, "save: {status} {body}");
        }
        let (status, body) = api.post(&format!("{}/submit", slot_path(id, slot)), json!({})).await?;
        anyhow::ensure!(status == StatusCode::NO_CONTENT, "submit: {status} {body}");
    }

    let (status, body) = owner.get(&format!("/api/v1/annotation-projects/{id}/export?format=yolo")).await?;
    anyhow::ensure!(status == StatusCode::CONFLICT, "a task nobody took: no export but a partial one: {status} {body}");
    let files = tar_files(&owner, &format!("/api/v1/annotation-projects/{id}/export?format=yolo&partial=true")).await?;
    anyhow::ensure!(files.get("classes.txt").map(String::as_str) == Some("cat\ndog\n"), "classes: {files:?}");
    let line: Vec<f64> = files.get("labels/img1.txt").map(|l| l.split_whitespace().filter_map(|v| v.parse().ok()).collect()).unwrap_or_default();
    let want = [0.0, 35.0 / 120.0, 35.0 / 80.0, 30.0 / 120.0, 30.0 / 80.0];
    anyhow::ensure!(line.len() == 5 && line.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "img1's cat in YOLO: {line:?}");
    anyhow::ensure!(
        files.get("labels/img2.txt").is_some_and(|l| l.starts_with("1 ")) && !files.contains_key("labels/img0.txt"),
        "img2's dog; img0, whose task nobody took, left out: {files:?}"
    );
    let voc = tar_files(&owner, &format!("/api/v1/annotation-projects/{id}/export?format=voc&partial=true")).await?;
    anyhow::ensure!(
        voc.get("Annotations/img1.xml").is_some_and(|x| x.contains("<name>cat</name>") && x.contains("<xmin>21</xmin>") && x.contains("<xmax>50</xmax>")),
        "VOC: {voc:?}"
    );
    Ok(())
}

/// A tar the API answers with, as name → text.
async fn tar_files(api: &Api, path: &str) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let bytes = api.get_bytes(path).await?;
    let mut out = std::collections::BTreeMap::new();
    for entry in tar::Archive::new(bytes.as_slice()).entries()? {
        let mut entry = entry?;
        if entry.header().entry_type().is_file() {
            let name = entry.path()?.to_string_lossy().trim_start_matches("./").to_owned();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text)?;
            out.insert(name, text);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn open_calls_pushes_pre_annotations_and_exports_on_sqlite() -> anyhow::Result<()> {
    run(Backend::Sqlite, |w| Box::pin(open_calls_pushes_pre_annotations_and_exports(w))).await
}

#[tokio::test]
async fn open_calls_pushes_pre_annotations_and_exports_on_postgres() -> anyhow::Result<()> {
    run(Backend::Postgres, |w| Box::pin(open_calls_pushes_pre_annotations_and_exports(w))).await
}
