//! Datasets end to end against the raw transfer of the same bytes to the same S3 server.
//!
//! - **Push**: `suanli data push FOLDER` (packing into a tar with its SHA-256, a tus upload to
//!   the portal in 16 MiB PATCHes, the portal hashing it whole, then the import: every picture
//!   decoded and checked, stored once by content in the S3 bucket, the version written to
//!   SQL) against one object PUT of the same tar to the same server through `object_store`'s
//!   multipart writer (what `aws s3 cp` does).
//! - **Pull**: `suanli data pull` (the portal streaming the version's archive out of S3, the
//!   CLI unpacking it and checking each file's SHA-256) against one object GET of the tar.
//! - **Import of many small pictures**: `--small` 32×32 PNGs in one tar, pushed as one upload:
//!   time and pictures per second.
//!
//! Starts a one-node broker, SeaweedFS (`weed`, from ops/install-build-deps), a portal whose
//! datasets live in the bucket, and the `suanli` binary; everything on this machine.
//!
//! `cargo bench -p suanli-portal --bench datasets --profile dev -- --mib 1024 --small 100000 [--local]`

use std::path::Path;
use std::time::Instant;

use suanli_artifacts::{Bucket, BucketConfig};
use suanli_proto::v1::AccountKind;
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::portal::researcher_portal;
use suanli_testkit::s3::{S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use suanli_testkit::workspace_binary;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn noise_png(edge: u32, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let img = image::RgbImage::from_fn(edge, edge, |_, _| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let b = (state >> 33).to_le_bytes();
        image::Rgb([b[0], b[1], b[2]])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

/// `count` pictures of about 1 MiB each, in ten class folders.
fn big_folder(dir: &Path, count: u64) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for i in 0..count {
        let class = dir.join(format!("class{}", i % 10));
        std::fs::create_dir_all(&class)?;
        let png = noise_png(590, i);
        bytes += png.len() as u64;
        std::fs::write(class.join(format!("{i:05}.png")), png)?;
    }
    Ok(bytes)
}

/// `count` small pictures in one tar, in ten class folders.
fn small_tar(path: &Path, count: u64) -> anyhow::Result<u64> {
    let mut builder = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    for i in 0..count {
        let png = noise_png(32, i);
        let mut header = tar::Header::new_gnu();
        header.set_size(png.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, format!("class{}/{i:06}.png", i % 10), png.as_slice())?;
    }
    builder.into_inner()?;
    Ok(std::fs::metadata(path)?.len())
}

fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / seconds
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (mib, small) = (arg("--mib", 1024), arg("--small", 100_000));
    let dir = tempfile::TempDir::new()?;
    let s3 = S3Server::start(dir.path()).await?;
    s3.create_bucket("datasets").await?;
    s3.create_bucket("raw").await?;
    // The portal and this process read the bucket's secret from the environment.
    std::env::set_var("SUANLI_S3_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY);
    let config = dir.path().join("portal.toml");
    std::fs::write(&config, format!("[portal.datasets_bucket]\nendpoint = \"{}\"\nbucket = \"datasets\"\naccess_key_id = \"{ACCESS_KEY_ID}\"\n", s3.endpoint))?;

    let broker = BrokerCluster::start(&workspace_binary("suanli-broker", "suanli-broker")?, 1, None).await?;
    broker.leader(std::time::Duration::from_secs(20)).await?;
    let mut platform = broker.client(1, PLATFORM_TOKEN).await?;
    let (researcher, broker_token) = suanli_testkit::fixtures::register(&mut platform, AccountKind::Researcher, "bench-researcher").await?;
    let broker_url = format!("http://{}", broker.address(1)?);
    // `--local`: the portal keeps datasets' files on its own disk (the embedded default).
    let local = std::env::args().any(|a| a == "--local");
    let mut more = vec!["--dataset-quota-bytes".to_owned(), "1000000000000".to_owned()];
    if !local {
        more.extend(["--config".to_owned(), config.display().to_string()]);
    }
    let more: Vec<&str> = more.iter().map(String::as_str).collect();
    let (portal, token) =
        researcher_portal(dir.path(), &broker_url, PLATFORM_TOKEN, (researcher, &broker_token), suanli_portal::demo::DEMO_PASSWORD, &more).await?;
    let cli_config = dir.path().join("cli");
    let suanli = |args: &[&str]| {
        let mut c = std::process::Command::new(workspace_binary("suanli-cli", "suanli").expect("suanli"));
        c.env("SUANLI_CONFIG_DIR", &cli_config).env("SUANLI_TOKEN", &token).args(args);
        c
    };
    let run = |args: &[&str]| -> anyhow::Result<f64> {
        let started = Instant::now();
        let out = suanli(args).output()?;
        let seconds = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            out.status.success(),
            "suanli {args:?}: {}{}\n--- portal ---\n{}\n--- S3 server ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            portal.service.log(),
            s3.log()
        );
        Ok(seconds)
    };
    run(&["login", "--portal", &portal.url])?;

    // ---- about 1 GiB of pictures ----
    let folder = dir.path().join("big");
    let picture_bytes = big_folder(&folder, mib)?;
    let raw_tar = dir.path().join("big.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&raw_tar)?);
        b.mode(tar::HeaderMode::Deterministic);
        b.append_dir_all(".", &folder)?;
        b.into_inner()?;
    }
    let tar_bytes = std::fs::metadata(&raw_tar)?.len();
    let bucket = Bucket::connect(&BucketConfig {
        endpoint: s3.endpoint.clone(),
        bucket: "raw".into(),
        region: "us-east-1".into(),
        access_key_id: ACCESS_KEY_ID.into(),
        secret_access_key_env: "SUANLI_S3_SECRET_ACCESS_KEY".into(),
        prefix: String::new(),
    })?;
    let started = Instant::now();
    bucket.put_file("big.tar", &raw_tar).await?;
    let raw_put = started.elapsed().as_secs_f64();
    let back = dir.path().join("big-back.tar");
    let started = Instant::now();
    bucket.get_file("big.tar", &back).await?;
    let raw_get = started.elapsed().as_secs_f64();
    std::fs::remove_file(&back)?;

    let push = run(&["data", "push", &folder.display().to_string(), "--to", "big", "--create", "-m", "bench"])?;
    let pulled = dir.path().join("pulled");
    let pull = run(&["data", "pull", "big", "--dir", &pulled.display().to_string()])?;

    // ---- many small pictures ----
    let small_path = dir.path().join("small.tar");
    let small_bytes = small_tar(&small_path, small)?;
    let import = run(&["data", "push", &small_path.display().to_string(), "--to", "small", "--create", "-m", "bench"])?;

    let kept = if local { "the portal's disk" } else { "the S3 bucket" };
    println!("datasets through the portal and `suanli` (files kept in {kept}) against raw S3 transfer (SeaweedFS on this machine)");
    println!("{} pictures, {picture_bytes} bytes of PNG, a {tar_bytes}-byte tar", mib);
    println!("| what | raw S3 (object_store) | portal + suanli | ratio |");
    println!("|---|---|---|---|");
    let (raw_up, up) = (mib_per_s(tar_bytes, raw_put), mib_per_s(tar_bytes, push));
    let (raw_down, down) = (mib_per_s(tar_bytes, raw_get), mib_per_s(tar_bytes, pull));
    println!("| push (upload + import) | {raw_up:.1} MiB/s ({raw_put:.1} s) | {up:.1} MiB/s ({push:.1} s) | {:.2} |", up / raw_up);
    println!("| pull (archive, checked) | {raw_down:.1} MiB/s ({raw_get:.1} s) | {down:.1} MiB/s ({pull:.1} s) | {:.2} |", down / raw_down);
    println!("import of {small} pictures of 32x32 ({small_bytes}-byte tar): {import:.1} s, {:.0} pictures/s", small as f64 / import);
    drop(portal);
    drop(broker);
    drop(s3);
    Ok(())
}
