//! Build and query benchmark of a `LibraryIndex` (usearch HNSW) against brute force.
//!
//! ```text
//! cargo bench -p suanli-search --bench index -- --n 100000 --dim 512 --queries 1000
//!     [--k 10] [--m 16] [--ef-construction 128] [--ef-search 256] [--seed 1]
//!     [--vectors FILE]         base vectors, raw little-endian f32, n = len / (4 dim)
//!     [--query-vectors FILE]   queries, same layout (default: seeded random)
//!     [--write-vectors DIR]    writes base.f32, queries.f32, truth.u64 (exact top-k ids),
//!                              meta.json and ours.json for bench/faiss_compare.py
//! ```
//!
//! Prints one Markdown table row: build seconds (sequential inserts, as the portal indexes),
//! memory (usearch's own accounting), recall@k against exact top-k over the queries, QPS
//! and p50/p99 latency of single-threaded sequential queries.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use suanli_search::{IndexParams, LibraryIndex, ModelVersion, Space};

struct Args {
    n: usize,
    dim: usize,
    queries: usize,
    k: usize,
    params: IndexParams,
    seed: u64,
    vectors: Option<PathBuf>,
    query_vectors: Option<PathBuf>,
    write_vectors: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    // faiss's customary HNSW M=16 (bench/faiss_compare.py matches efConstruction and tunes
    // efSearch to our recall), not the library's recall-first defaults.
    let mut a = Args {
        n: 100_000,
        dim: 512,
        queries: 1000,
        k: 10,
        params: IndexParams { connectivity: 16, expansion_add: 128, expansion_search: 256 },
        seed: 1,
        vectors: None,
        query_vectors: None,
        write_vectors: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench`; ignore it.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--n" => a.n = num(&value)?,
            "--dim" => a.dim = num(&value)?,
            "--queries" => a.queries = num(&value)?,
            "--k" => a.k = num(&value)?,
            "--m" => a.params.connectivity = num(&value)?,
            "--ef-construction" => a.params.expansion_add = num(&value)?,
            "--ef-search" => a.params.expansion_search = num(&value)?,
            "--seed" => a.seed = num(&value)? as u64,
            "--vectors" => a.vectors = Some(value.into()),
            "--query-vectors" => a.query_vectors = Some(value.into()),
            "--write-vectors" => a.write_vectors = Some(value.into()),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

fn random_unit(rng: &mut StdRng, dim: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    normalise(&mut v);
    v
}

fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = (f64::from(*x) / norm) as f32);
    }
}

fn read_f32(path: &Path, dim: usize) -> Result<Vec<Vec<f32>>, String> {
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() % (4 * dim) != 0 {
        return Err(format!("{}: length is not a multiple of 4·dim", path.display()));
    }
    Ok(bytes
        .chunks_exact(4 * dim)
        .map(|row| {
            let mut v: Vec<f32> = row.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            normalise(&mut v);
            v
        })
        .collect())
}

fn write_f32(path: &Path, rows: &[Vec<f32>]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(fs::File::create(path)?);
    for row in rows {
        for x in row {
            out.write_all(&x.to_le_bytes())?;
        }
    }
    out.flush()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators so the compiler vectorises it.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, xi), yi) in acc.iter_mut().zip(x).zip(y) {
            *s += xi * yi;
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// Exact top-k ids of every query by inner product (the vectors are unit length, so this
/// is cosine), on all cores.
fn exact_topk(base: &[Vec<f32>], queries: &[Vec<f32>], k: usize) -> Vec<Vec<u64>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = queries.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = queries
            .chunks(chunk)
            .map(|qs| {
                s.spawn(move || {
                    qs.iter()
                        .map(|q| {
                            let mut scored: Vec<(f32, u64)> = base.iter().enumerate().map(|(i, v)| (dot(v, q), i as u64)).collect();
                            let kk = k.min(scored.len());
                            let cmp = |a: &(f32, u64), b: &(f32, u64)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
                            if kk > 0 && kk < scored.len() {
                                scored.select_nth_unstable_by(kk - 1, cmp);
                            }
                            scored.truncate(kk);
                            scored.sort_unstable_by(cmp);
                            scored.into_iter().map(|(_, i)| i).collect()
                        })
                        .collect::<Vec<Vec<u64>>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("exact search thread")).collect()
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn run() -> Result<(), String> {
    let a = parse_args()?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let base = match &a.vectors {
        Some(p) => read_f32(p, a.dim)?,
        None => (0..a.n).map(|_| random_unit(&mut rng, a.dim)).collect(),
    };
    let queries = match &a.query_vectors {
        Some(p) => read_f32(p, a.dim)?,
        None => (0..a.queries).map(|_| random_unit(&mut rng, a.dim)).collect(),
    };
    let (n, nq) = (base.len(), queries.len());
    eprintln!("{n} base vectors, {nq} queries, dim {}, {:?}", a.dim, a.params);

    let t = Instant::now();
    let truth = exact_topk(&base, &queries, a.k);
    eprintln!("exact top-{} in {:.1} s", a.k, t.elapsed().as_secs_f64());

    let model: ModelVersion = "bench@1".parse().map_err(|e| format!("{e}"))?;
    let space = Space { model: model.clone(), dim: u32::try_from(a.dim).map_err(|e| e.to_string())? };
    let mut index = LibraryIndex::create(space, a.params).map_err(|e| e.to_string())?;
    let t = Instant::now();
    for (i, v) in base.iter().enumerate() {
        index.insert(i as u64, &model, v).map_err(|e| e.to_string())?;
        if i > 0 && i % 100_000 == 0 {
            eprintln!("  {i} inserted, {:.1} s", t.elapsed().as_secs_f64());
        }
    }
    let build_s = t.elapsed().as_secs_f64();
    eprintln!("usearch kernels: {}", index.hardware_acceleration());
    let memory_mb = index.memory_bytes() as f64 / (1024.0 * 1024.0);

    let mut latencies = Vec::with_capacity(nq);
    let mut found = 0usize;
    let t = Instant::now();
    for (q, want) in queries.iter().zip(&truth) {
        let tq = Instant::now();
        let hits = index.search(&model, q, a.k, None).map_err(|e| e.to_string())?;
        latencies.push(tq.elapsed().as_secs_f64() * 1e6);
        let want: HashSet<u64> = want.iter().copied().collect();
        found += hits.iter().filter(|h| want.contains(&h.key)).count();
    }
    let search_s = t.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let recall = found as f64 / (nq * a.k).max(1) as f64;
    let qps = nq as f64 / search_s;
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));

    println!("| engine | index | n | dim | build s | memory MB | recall@{} | QPS | p50 µs | p99 µs |", a.k);
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| suanli-search (usearch {}) | HNSW M={} efC={} efS={} | {n} | {} | {build_s:.1} | {memory_mb:.0} | {recall:.4} | {qps:.0} | {p50:.0} | {p99:.0} |",
        usearch::version(),
        a.params.connectivity,
        a.params.expansion_add,
        a.params.expansion_search,
        a.dim
    );

    if let Some(dir) = &a.write_vectors {
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        write_f32(&dir.join("base.f32"), &base).map_err(|e| e.to_string())?;
        write_f32(&dir.join("queries.f32"), &queries).map_err(|e| e.to_string())?;
        let ids: Vec<u8> = truth.iter().flat_map(|row| row.iter().flat_map(|id| id.to_le_bytes())).collect();
        fs::write(dir.join("truth.u64"), ids).map_err(|e| e.to_string())?;
        fs::write(dir.join("meta.json"), format!("{{\"n\":{n},\"dim\":{},\"queries\":{nq},\"k\":{}}}\n", a.dim, a.k)).map_err(|e| e.to_string())?;
        fs::write(
            dir.join("ours.json"),
            format!(
                "{{\"m\":{},\"ef_construction\":{},\"ef_search\":{},\"build_s\":{build_s},\"memory_mb\":{memory_mb},\"recall\":{recall},\"qps\":{qps},\"p50_us\":{p50},\"p99_us\":{p99}}}\n",
                a.params.connectivity, a.params.expansion_add, a.params.expansion_search
            ),
        )
        .map_err(|e| e.to_string())?;
        eprintln!("wrote vectors, queries, truth to {}", dir.display());
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
