//! Exact top-k by brute force: the ground truth that the HNSW index's recall is measured
//! against in tests and in `benches/index.rs`. Linear in the number of vectors; not for
//! serving.

use crate::index::Hit;

/// Exact top-`k` by cosine similarity, best first (ties broken by smaller key).
///
/// Vectors of another length than `query`, and zero vectors, are skipped.
pub fn exact_search(vectors: &[(u64, Vec<f32>)], query: &[f32], k: usize) -> Vec<Hit> {
    if k == 0 {
        return Vec::new();
    }
    let qn = norm(query);
    if qn == 0.0 {
        return Vec::new();
    }
    let mut hits: Vec<Hit> = vectors
        .iter()
        .filter(|(_, v)| v.len() == query.len())
        .filter_map(|(key, v)| {
            let vn = norm(v);
            (vn > 0.0).then(|| {
                let dot: f64 = v.iter().zip(query).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                Hit { key: *key, score: (dot / (vn * qn)) as f32 }
            })
        })
        .collect();
    let by_rank = |a: &Hit, b: &Hit| b.score.total_cmp(&a.score).then(a.key.cmp(&b.key));
    if hits.len() > k {
        hits.select_nth_unstable_by(k - 1, by_rank);
        hits.truncate(k);
    }
    hits.sort_unstable_by(by_rank);
    hits
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_search_ranks_by_cosine_best_first() {
        let vs = vec![(1, vec![1.0, 0.0]), (2, vec![0.0, 1.0]), (3, vec![0.6, 0.8]), (4, vec![-1.0, 0.0])];
        let hits = exact_search(&vs, &[1.0, 0.0], 3);
        let keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
        assert_eq!(keys, vec![1, 3, 2]);
        assert!((hits[0].score - 1.0).abs() < 1e-6);
        assert!((hits[1].score - 0.6).abs() < 1e-6);
        assert_eq!(exact_search(&vs, &[1.0, 0.0], 0), Vec::new());
        assert_eq!(exact_search(&vs, &[1.0, 0.0], 10).len(), 4);
    }
}
