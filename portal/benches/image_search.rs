//! Similar-image search end to end through the portal's API, against the embedder alone.
//!
//! Starts a one-node broker, the embedder (`suanli-job serve` in embed mode on this host's CPU,
//! the untrained ResNet-18 backbone of the tests) and a portal searching with it; pushes
//! `--images` distinct pictures as one dataset, adds it to the researcher's library and times
//! the indexing; then, for `--queries` query pictures, times
//! - **embed only**: `POST /v1/predict` to the embedder, the query's vector and nothing else
//!   (the baseline: seed 003's "feature extraction < 1 s per image on CPU");
//! - **search through the API**: `POST /api/v1/image-search?library=mine&top=20`, what a
//!   researcher's page or `suanli search-images` does: the portal authenticates, has the
//!   picture embedded, searches the library's index and reads the hits' rows from SQL (seed
//!   003's "top-K < 500 ms at 10^4–10^5 images").
//!
//! Prints p50/p99 of both and the ratio (the search's cost over embedding alone).
//!
//! `SUANLI_JOB_BINARY=… cargo bench -p suanli-portal --bench image_search -- --images 10000 --queries 200`

use std::path::Path;
use std::time::{Duration, Instant};

use suanli_proto::v1::AccountKind;
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::portal::researcher_portal;
use suanli_testkit::workspace_binary;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A distinct 64×64 picture per `seed`: smooth colour fields, so no two embed alike.
fn picture(seed: u64) -> Vec<u8> {
    let (a, b, c) = ((seed % 251) as f32, ((seed / 251) % 241) as f32, ((seed / 60_491) % 239) as f32);
    let img = image::RgbImage::from_fn(64, 64, |x, y| {
        let (x, y) = (x as f32, y as f32);
        image::Rgb([
            ((x * a / 16.0 + y).sin() * 127.0 + 128.0) as u8,
            ((y * b / 16.0 + x).cos() * 127.0 + 128.0) as u8,
            (((x + y) * c / 32.0).sin() * 127.0 + 128.0) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

fn library_tar(path: &Path, count: u64) -> anyhow::Result<()> {
    let mut builder = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    for i in 0..count {
        let png = picture(i);
        let mut header = tar::Header::new_gnu();
        header.set_size(png.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, format!("library/{i:07}.png"), png.as_slice())?;
    }
    builder.into_inner()?;
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (images, queries) = (arg("--images", 10_000), arg("--queries", 200));
    let Some(job) = suanli_testkit::embedder::job_binary() else { anyhow::bail!("set SUANLI_JOB_BINARY to the torch build of suanli-job") };
    let dir = tempfile::TempDir::new()?;
    let embedder = suanli_testkit::embedder::start(&job, dir.path(), 7).await?;
    let embedder_url = embedder.get("url")?.to_owned();
    let token_file = dir.path().join("embedder-token");
    std::fs::write(&token_file, suanli_testkit::embedder::TOKEN)?;

    let broker = BrokerCluster::start(&workspace_binary("suanli-broker", "suanli-broker")?, 1, None).await?;
    broker.leader(Duration::from_secs(20)).await?;
    let mut platform = broker.client(1, PLATFORM_TOKEN).await?;
    let (researcher, broker_token) = suanli_testkit::fixtures::register(&mut platform, AccountKind::Researcher, "bench-researcher").await?;
    let broker_url = format!("http://{}", broker.address(1)?);
    let token_path = token_file.display().to_string();
    let more = ["--dataset-quota-bytes", "1000000000000", "--image-embedder-url", &embedder_url, "--image-embedder-token-file", &token_path];
    let (portal, token) =
        researcher_portal(dir.path(), &broker_url, PLATFORM_TOKEN, (researcher, &broker_token), suanli_portal::demo::DEMO_PASSWORD, &more).await?;

    // The library: one dataset version, pushed with the CLI, added to the researcher's library.
    let tar = dir.path().join("library.tar");
    library_tar(&tar, images)?;
    let cli_config = dir.path().join("cli");
    let suanli = |args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(workspace_binary("suanli-cli", "suanli")?)
            .env("SUANLI_CONFIG_DIR", &cli_config)
            .env("SUANLI_TOKEN", &token)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "suanli {args:?}: {}{}\n--- portal ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            portal.service.log()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    suanli(&["login", "--portal", &portal.url])?;
    suanli(&["data", "push", &tar.display().to_string(), "--to", "library", "--create"])?;
    let started = Instant::now();
    suanli(&["library", "add", "library"])?;
    let http = reqwest::Client::new();
    loop {
        let libraries: serde_json::Value = http.get(format!("{}/api/v1/image-libraries", portal.url)).bearer_auth(&token).send().await?.json().await?;
        let mine = &libraries[0];
        anyhow::ensure!(mine["state"] != "failed", "indexing failed: {mine}");
        if mine["state"] == "done" && mine["indexed"] == images {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let indexing = started.elapsed().as_secs_f64();

    // Queries: pictures of the library, so every search has a true nearest neighbour.
    let (mut embed_ms, mut search_ms) = (Vec::new(), Vec::new());
    for q in 0..queries {
        let png = picture(q * 7919 % images);
        let t = Instant::now();
        let r = http.post(format!("{embedder_url}/v1/predict")).bearer_auth(suanli_testkit::embedder::TOKEN).body(png.clone()).send().await?;
        anyhow::ensure!(r.status().is_success(), "embedder: {}", r.text().await?);
        r.bytes().await?;
        embed_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let r = http.post(format!("{}/api/v1/image-search?library=mine&top=20", portal.url)).bearer_auth(&token).body(png).send().await?;
        anyhow::ensure!(r.status().is_success(), "search: {}", r.text().await?);
        let found: serde_json::Value = r.json().await?;
        search_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(found["results"].as_array().is_some_and(|a| a.len() == 20), "20 results: {found}");
    }
    embed_ms.sort_by(f64::total_cmp);
    search_ms.sort_by(f64::total_cmp);
    println!("image search, {images} pictures in the library, {queries} queries (64x64 PNG), this host's CPU");
    println!("indexing: {indexing:.1} s, {:.0} pictures/s (embedding included)", images as f64 / indexing);
    println!("{:<32} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    println!("{:<32} {:>10.1} {:>10.1}", "embed only (embedder direct)", percentile(&embed_ms, 0.5), percentile(&embed_ms, 0.99));
    println!("{:<32} {:>10.1} {:>10.1}", "search through the portal API", percentile(&search_ms, 0.5), percentile(&search_ms, 0.99));
    println!("ratio (search / embed only), p50: {:.2}", percentile(&search_ms, 0.5) / percentile(&embed_ms, 0.5));
    Ok(())
}
