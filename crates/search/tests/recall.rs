//! Recall of the HNSW index against brute force, on the hard case: uniformly random unit
//! vectors (no cluster structure to exploit).

mod common;

use std::collections::HashSet;

use common::*;
use suanli_search::exact_search;

#[test]
fn recall_at_10_is_at_least_0_95_on_20k_random_128d_vectors() {
    const N: usize = 20_000;
    const DIM: usize = 128;
    const QUERIES: usize = 100;
    const K: usize = 10;
    let data = dataset(40, N, DIM);
    let idx = build(DIM as u32, &data);
    assert_eq!(idx.len(), N);
    let queries = dataset(41, QUERIES, DIM);
    let mut found = 0;
    for (_, q) in &queries {
        let truth: HashSet<u64> = exact_search(&data, q, K).iter().map(|h| h.key).collect();
        let hits = idx.search(&model(), q, K, None).expect("search");
        assert_eq!(hits.len(), K);
        found += hits.iter().filter(|h| truth.contains(&h.key)).count();
    }
    let recall = found as f64 / (QUERIES * K) as f64;
    eprintln!("recall@{K} = {recall:.4} ({N} × {DIM}-d, {QUERIES} queries)");
    assert!(recall >= 0.95, "recall@{K} = {recall}");
}
