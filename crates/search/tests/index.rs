//! Behaviour of an in-memory `LibraryIndex`: inserts, removals, validation, filters,
//! concurrency.

mod common;

use std::sync::{Arc, RwLock};

use common::*;
use suanli_search::{IndexParams, LibraryIndex, SearchError};

const DIM: u32 = 32;

#[test]
fn inserted_vectors_are_found_as_their_own_top_hit() {
    let data = dataset(1, 500, DIM as usize);
    let idx = build(DIM, &data);
    assert_eq!(idx.len(), 500);
    for (k, v) in data.iter().step_by(7) {
        let hits = idx.search(&model(), v, 5, None).expect("search");
        assert_eq!(hits[0].key, *k);
        assert!((hits[0].score - 1.0).abs() < 1e-4, "score {}", hits[0].score);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score), "not best first");
    }
}

#[test]
fn insert_twice_adds_nothing() {
    let data = dataset(2, 50, DIM as usize);
    let mut idx = build(DIM, &data);
    let other = unit_vector(&mut rng(99), DIM as usize);
    for (k, v) in &data {
        assert!(!idx.insert(*k, &model(), v).expect("insert"));
        // Even with a different vector, the present one is kept.
        assert!(!idx.insert(*k, &model(), &other).expect("insert"));
    }
    assert_eq!(idx.len(), 50);
    let hits = idx.search(&model(), &data[3].1, 1, None).expect("search");
    assert_eq!(keys(&hits), vec![3]);
    assert!((hits[0].score - 1.0).abs() < 1e-4);
}

#[test]
fn removed_keys_are_never_returned() {
    let data = dataset(3, 300, DIM as usize);
    let mut idx = build(DIM, &data);
    for k in (0..300).step_by(3) {
        assert!(idx.remove(k).expect("remove"));
    }
    assert!(!idx.remove(0).expect("remove again"));
    assert!(!idx.remove(10_000).expect("remove absent"));
    assert_eq!(idx.len(), 200);
    assert!(!idx.contains(0) && idx.contains(1));
    for (_, v) in &data {
        let hits = idx.search(&model(), v, 300, None).expect("search");
        assert!(hits.iter().all(|h| !h.key.is_multiple_of(3)), "removed key returned");
    }
}

#[test]
fn removed_key_can_be_inserted_again() {
    let data = dataset(4, 20, DIM as usize);
    let mut idx = build(DIM, &data);
    assert!(idx.remove(5).expect("remove"));
    let fresh = unit_vector(&mut rng(44), DIM as usize);
    assert!(idx.insert(5, &model(), &fresh).expect("reinsert"));
    assert_eq!(idx.len(), 20);
    let hits = idx.search(&model(), &fresh, 1, None).expect("search");
    assert_eq!(keys(&hits), vec![5]);
}

#[test]
fn wrong_model_on_insert_is_refused_and_index_unchanged() {
    let data = dataset(5, 10, DIM as usize);
    let mut idx = build(DIM, &data);
    let v = unit_vector(&mut rng(55), DIM as usize);
    let err = idx.insert(100, &other_model(), &v).expect_err("refused");
    match err {
        SearchError::ModelMismatch { index, given } => {
            assert_eq!(index, model());
            assert_eq!(given, other_model());
        }
        e => panic!("unexpected {e:?}"),
    }
    assert_eq!(idx.len(), 10);
    assert!(!idx.contains(100));
}

#[test]
fn wrong_model_on_search_is_refused() {
    let data = dataset(6, 10, DIM as usize);
    let idx = build(DIM, &data);
    assert!(matches!(idx.search(&other_model(), &data[0].1, 3, None), Err(SearchError::ModelMismatch { .. })));
}

#[test]
fn wrong_dimension_is_refused() {
    let mut idx = build(DIM, &dataset(7, 10, DIM as usize));
    let short = unit_vector(&mut rng(7), DIM as usize - 1);
    assert!(matches!(
        idx.insert(100, &model(), &short),
        Err(SearchError::Dimension { expected: DIM, given }) if given == DIM as usize - 1
    ));
    assert!(matches!(idx.search(&model(), &short, 3, None), Err(SearchError::Dimension { .. })));
    assert_eq!(idx.len(), 10);
}

#[test]
fn nan_and_infinity_are_refused() {
    let mut idx = build(DIM, &dataset(8, 10, DIM as usize));
    let mut v = unit_vector(&mut rng(8), DIM as usize);
    v[3] = f32::NAN;
    assert!(matches!(idx.insert(100, &model(), &v), Err(SearchError::NotFinite)));
    assert!(matches!(idx.search(&model(), &v, 3, None), Err(SearchError::NotFinite)));
    v[3] = f32::NEG_INFINITY;
    assert!(matches!(idx.insert(100, &model(), &v), Err(SearchError::NotFinite)));
    assert_eq!(idx.len(), 10);
}

#[test]
fn not_normalised_vectors_are_refused() {
    let mut idx = build(DIM, &dataset(9, 10, DIM as usize));
    let v: Vec<f32> = unit_vector(&mut rng(9), DIM as usize).iter().map(|x| x * 2.0).collect();
    match idx.insert(100, &model(), &v) {
        Err(SearchError::NotNormalised { norm }) => assert!((norm - 2.0).abs() < 1e-3),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(idx.search(&model(), &v, 3, None), Err(SearchError::NotNormalised { .. })));
    assert!(!idx.contains(100));
}

#[test]
fn filtered_search_returns_only_accepted_keys() {
    let data = dataset(10, 1000, DIM as usize);
    let idx = build(DIM, &data);
    let even = |k: u64| k.is_multiple_of(2);
    for (k, v) in data.iter().take(50) {
        let hits = idx.search(&model(), v, 10, Some(&even)).expect("search");
        assert_eq!(hits.len(), 10);
        assert!(hits.iter().all(|h| h.key.is_multiple_of(2)), "{:?}", keys(&hits));
        if k.is_multiple_of(2) {
            assert_eq!(hits[0].key, *k);
        }
    }
    let none = |_: u64| false;
    assert!(idx.search(&model(), &data[0].1, 10, Some(&none)).expect("search").is_empty());
}

#[test]
fn k_is_capped_at_len_and_empty_index_returns_nothing() {
    let data = dataset(11, 7, DIM as usize);
    let idx = build(DIM, &data);
    let hits = idx.search(&model(), &data[0].1, 100, None).expect("search");
    assert_eq!(hits.len(), 7);
    assert!(idx.search(&model(), &data[0].1, 0, None).expect("search").is_empty());

    let empty = LibraryIndex::create(space(DIM), IndexParams::default()).expect("create");
    assert!(empty.is_empty());
    assert!(empty.search(&model(), &data[0].1, 10, None).expect("search").is_empty());
}

#[test]
fn scores_are_cosine_similarities() {
    let mut idx = LibraryIndex::create(space(2), IndexParams::default()).expect("create");
    idx.insert(1, &model(), &[1.0, 0.0]).expect("insert");
    idx.insert(2, &model(), &[0.6, 0.8]).expect("insert");
    idx.insert(3, &model(), &[-1.0, 0.0]).expect("insert");
    let hits = idx.search(&model(), &[1.0, 0.0], 3, None).expect("search");
    assert_eq!(keys(&hits), vec![1, 2, 3]);
    for (hit, want) in hits.iter().zip([1.0, 0.6, -1.0]) {
        assert!((hit.score - want).abs() < 1e-5, "{hit:?} want {want}");
    }
}

#[test]
fn index_grows_past_its_initial_reservation() {
    let data = dataset(12, 3000, 8);
    let idx = build(8, &data);
    assert_eq!(idx.len(), 3000);
    assert!(idx.memory_bytes() > 3000 * 8 * 4);
}

#[test]
fn index_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<LibraryIndex>();
    assert_send_sync::<SearchError>();
}

#[test]
fn many_concurrent_searches_under_a_read_lock_all_succeed() {
    let data = Arc::new(dataset(13, 2000, DIM as usize));
    let idx = Arc::new(RwLock::new(build(DIM, &data)));
    // More threads than usearch has search contexts: the extra ones wait, none fails.
    let threads: Vec<_> = (0..48)
        .map(|t| {
            let idx = Arc::clone(&idx);
            let data = Arc::clone(&data);
            std::thread::spawn(move || {
                let guard = idx.read().expect("read lock");
                for i in 0..25 {
                    let (k, v) = &data[(t * 25 + i) % data.len()];
                    let hits = guard.search(&model(), v, 10, None).expect("search");
                    assert_eq!(hits[0].key, *k);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("search thread");
    }
}
