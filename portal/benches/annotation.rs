//! Crowdsourced annotation at scale, on the portal's own SQL (SQLite, or the PostgreSQL in
//! `SUANLI_TEST_POSTGRES_URL` with `--postgres`), calling the portal's library functions:
//!
//! - **task assignment**: `--annotators` (default 1,000) pull a task at once from a project
//!   with a slot for each (`annotation::pull`: one statement picks and takes a free slot from
//!   a partial index of free slots); pulls/s,
//!   p50 and p99. Baseline in the same run: as many concurrent single-row `UPDATE`s by primary
//!   key through the same pool (the database's own write rate): the ratio is what the
//!   assignment's extra reads and lost races cost.
//! - **dashboard** at `--images` (default 100,000) images, every one complete (tasks of 3,
//!   three annotators each, results, labels, scores as a finished project has them):
//!   `dashboard_of` p50/p99 over 20 calls, beside one `COUNT(*)` over the project's images.
//!
//! `cargo bench -p suanli-portal --bench annotation -- --annotators 1000 --images 100000 [--postgres]`

use std::time::{Duration, Instant};

use suanli_portal::annotation::{pull, Project};
use suanli_portal::db::Db;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

fn project(id: i64, images: i64) -> anyhow::Result<Project> {
    Ok(Project {
        id,
        owner: 1,
        name: format!("bench{id}"),
        dataset_id: 1,
        version: 1,
        schema: serde_json::from_str(r##"{"classes": [{"name": "cat", "colour": "#ff0000"}, {"name": "dog", "colour": "#00ff00"}], "kinds": ["box"]}"##)?,
        task_size: 3,
        overlap: 3,
        lease_ms: 600_000,
        open_call: false,
        images,
        created_ms: 0,
    })
}

/// Runs `rows` inserts of `columns` values each, 400 rows a statement.
async fn insert_many(db: &Db, table: &str, columns: &[&str], rows: usize, value: impl Fn(usize, usize) -> String) -> anyhow::Result<()> {
    for start in (0..rows).step_by(400) {
        let end = (start + 400).min(rows);
        let values: Vec<String> = (start..end).map(|r| format!("({})", (0..columns.len()).map(|c| value(r, c)).collect::<Vec<_>>().join(", "))).collect();
        sqlx::query(&format!("INSERT INTO {table} ({}) VALUES {}", columns.join(", "), values.join(", "))).execute(&db.pool).await?;
    }
    Ok(())
}

/// A project of `tasks` tasks of 3 images with 3 open slots each.
async fn seed_project(db: &Db, p: &Project, tasks: usize, complete: bool) -> anyhow::Result<()> {
    let id = p.id;
    sqlx::query(&format!(
        "INSERT INTO annotation_projects (id, owner, name, dataset_id, version, label_schema, task_size, overlap, lease_ms, open_call, images, created_ms) VALUES ({id}, 1, '{}', 1, 1, '{}', 3, 3, 600000, 0, {}, 0)",
        p.name,
        serde_json::to_string(&p.schema)?,
        tasks * 3
    ))
    .execute(&db.pool)
    .await?;
    insert_many(db, "annotation_images", &["project_id", "image_no", "name", "sha256", "size", "width", "height", "honeypot"], tasks * 3, |r, c| match c {
        0 => id.to_string(),
        1 => r.to_string(),
        2 => format!("'img{r}.jpg'"),
        3 => format!("'{:064x}'", r),
        4 => "1000".into(),
        5 => "640".into(),
        6 => "480".into(),
        _ => "0".into(),
    })
    .await?;
    insert_many(db, "annotation_tasks", &["project_id", "task_no", "images", "image_count"], tasks, |r, c| match c {
        0 => id.to_string(),
        1 => r.to_string(),
        2 => format!("'[{}, {}, {}]'", 3 * r, 3 * r + 1, 3 * r + 2),
        _ => "3".into(),
    })
    .await?;
    let annotator = |slot: usize, task: usize| 1000 + ((task + slot) % 50) as i64;
    insert_many(db, "annotation_slots", &["project_id", "task_no", "slot", "state", "annotator", "generation", "images"], tasks * 3, |r, c| {
        let (task, slot) = (r / 3, r % 3);
        match c {
            0 => id.to_string(),
            1 => task.to_string(),
            2 => slot.to_string(),
            3 => {
                if complete {
                    "'submitted'".into()
                } else {
                    "'open'".into()
                }
            }
            4 => {
                if complete {
                    annotator(slot, task).to_string()
                } else {
                    "NULL".into()
                }
            }
            _ => "0".into(),
        }
    })
    .await?;
    if complete {
        insert_many(
            db,
            "annotation_results",
            &["project_id", "image_no", "task_no", "agreement_ppm", "conflicts", "undecided", "shapes", "updated_ms"],
            tasks * 3,
            |r, c| match c {
                0 => id.to_string(),
                1 => r.to_string(),
                2 => (r / 3).to_string(),
                3 => (900_000 + r % 100_000).to_string(),
                4 => {
                    if r % 7 == 0 {
                        "1".into()
                    } else {
                        "0".into()
                    }
                }
                5 => "0".into(),
                6 => "'[]'".into(),
                _ => "0".into(),
            },
        )
        .await?;
        insert_many(db, "annotation_labels", &["project_id", "image_no", "label", "shapes"], tasks * 3, |r, c| match c {
            0 => id.to_string(),
            1 => r.to_string(),
            2 => {
                if r % 2 == 0 {
                    "'cat'".into()
                } else {
                    "'dog'".into()
                }
            }
            _ => "2".into(),
        })
        .await?;
        insert_many(db, "annotation_scores", &["project_id", "annotator", "image_no", "kind", "f1_ppm"], tasks * 9, |r, c| {
            let (image, k) = (r / 3, r % 3);
            match c {
                0 => id.to_string(),
                1 => annotator(k, image / 3).to_string(),
                2 => image.to_string(),
                3 => "'peer'".into(),
                _ => "950000".into(),
            }
        })
        .await?;
        insert_many(db, "annotation_time", &["project_id", "annotator", "task_no", "slot", "active_ms", "last_save_ms"], tasks * 3, |r, c| match c {
            0 => id.to_string(),
            1 => annotator(r % 3, r / 3).to_string(),
            2 => (r / 3).to_string(),
            3 => (r % 3).to_string(),
            4 => "60000".into(),
            _ => "0".into(),
        })
        .await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (annotators, images) = (arg("--annotators", 1000) as usize, arg("--images", 100_000) as usize);
    let postgres = std::env::args().any(|a| a == "--postgres");
    let dir = tempfile::TempDir::new()?;
    let url = suanli_testkit::portal::database_url(dir.path(), postgres).await?.ok_or_else(|| anyhow::anyhow!("--postgres needs SUANLI_TEST_POSTGRES_URL"))?;
    let db = Db::connect(&url).await?;
    println!("database: {}", if postgres { "PostgreSQL" } else { "SQLite (WAL)" });

    // Task assignment: one slot per annotator, all pulling at once.
    let assign = project(1, (annotators.div_ceil(3) * 3) as i64)?;
    seed_project(&db, &assign, annotators.div_ceil(3), false).await?;
    sqlx::query("CREATE TABLE bench_rows (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)").execute(&db.pool).await?;
    insert_many(&db, "bench_rows", &["id", "n"], annotators, |r, c| if c == 0 { r.to_string() } else { "0".into() }).await?;
    let baseline_started = Instant::now();
    let baseline: Vec<Duration> = futures::future::join_all((0..annotators).map(|i| {
        let db = db.clone();
        async move {
            let t = Instant::now();
            sqlx::query("UPDATE bench_rows SET n = n + 1 WHERE id = $1").bind(i as i64).execute(&db.pool).await.map(|_| t.elapsed())
        }
    }))
    .await
    .into_iter()
    .collect::<Result<_, _>>()?;
    let baseline_s = baseline_started.elapsed().as_secs_f64();
    let started = Instant::now();
    let pulls: Vec<anyhow::Result<(Duration, bool)>> = futures::future::join_all((0..annotators).map(|i| {
        let (db, p) = (db.clone(), assign.clone());
        async move {
            let t = Instant::now();
            let got = pull(&db, &p, 5000 + i as i64).await.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
            Ok((t.elapsed(), got.is_some()))
        }
    }))
    .await;
    let pull_s = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let (mut got, mut failed) = (0, 0);
    for p in pulls {
        match p {
            Ok((d, true)) => {
                latencies.push(d);
                got += 1;
            }
            Ok((_, false)) => failed += 1,
            Err(e) => {
                if failed == 0 {
                    println!("first failure: {e}");
                }
                failed += 1;
            }
        }
    }
    let distinct: i64 =
        sqlx::query_scalar("SELECT COUNT(DISTINCT annotator) FROM annotation_slots WHERE project_id = 1 AND state = 'held'").fetch_one(&db.pool).await?;
    latencies.sort();
    let mut base_sorted = baseline;
    base_sorted.sort();
    println!("\n{annotators} annotators pulling at once ({got} got a slot, {failed} did not; {distinct} distinct holders)");
    println!("| what | per second | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    println!(
        "| baseline: single-row UPDATE by key | {:.0} | {:.1} | {:.1} |",
        annotators as f64 / baseline_s,
        percentile(&base_sorted, 0.5),
        percentile(&base_sorted, 0.99)
    );
    println!("| pull (assign a slot) | {:.0} | {:.1} | {:.1} |", got as f64 / pull_s, percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    println!("ratio pull / baseline: {:.2}", (got as f64 / pull_s) / (annotators as f64 / baseline_s));

    // The dashboard of a finished project.
    let tasks = images.div_ceil(3);
    let seeding = Instant::now();
    let board = project(2, (tasks * 3) as i64)?;
    seed_project(&db, &board, tasks, true).await?;
    println!("\nseeded {} images, {} slots in {:.1} s", tasks * 3, tasks * 3, seeding.elapsed().as_secs_f64());
    let mut count_times = Vec::new();
    let mut board_times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM annotation_images WHERE project_id = 2").fetch_one(&db.pool).await?;
        count_times.push(t.elapsed());
        let t = Instant::now();
        let d = suanli_portal::api::annotation::dashboard_of(&db, &board).await.map_err(|e| anyhow::anyhow!("dashboard: {e}"))?;
        board_times.push(t.elapsed());
        anyhow::ensure!(d.images_complete as usize == tasks * 3 && d.annotators.len() == 50, "the dashboard counts every image: {}", d.images_complete);
    }
    count_times.sort();
    board_times.sort();
    println!("| what ({} images) | p50 ms | p99 ms |", tasks * 3);
    println!("|---|---|---|");
    println!("| baseline: COUNT(*) of the project's images | {:.1} | {:.1} |", percentile(&count_times, 0.5), percentile(&count_times, 0.99));
    println!("| dashboard | {:.1} | {:.1} |", percentile(&board_times, 0.5), percentile(&board_times, 0.99));
    drop(db);
    suanli_testkit::portal::drop_database(&url);
    Ok(())
}
