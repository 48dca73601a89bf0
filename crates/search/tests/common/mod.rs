//! Shared helpers for the integration tests: seeded random unit vectors and small indexes.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use suanli_search::{IndexParams, LibraryIndex, ModelVersion, Space};

pub fn model() -> ModelVersion {
    "resnet18w32@sha256:0123abcd".parse().expect("model")
}

pub fn other_model() -> ModelVersion {
    "resnet18w32@sha256:ffffffff".parse().expect("model")
}

pub fn space(dim: u32) -> Space {
    Space { model: model(), dim }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A random direction, uniform on the sphere (normalised Gaussian, Box–Muller).
pub fn unit_vector(rng: &mut StdRng, dim: usize) -> Vec<f32> {
    loop {
        let mut v: Vec<f32> = (0..dim)
            .map(|_| {
                let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = rng.random::<f64>();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect();
        let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        if norm > 1e-6 {
            v.iter_mut().for_each(|x| *x = (f64::from(*x) / norm) as f32);
            return v;
        }
    }
}

/// `n` keyed random unit vectors, keys `0..n`.
pub fn dataset(seed: u64, n: usize, dim: usize) -> Vec<(u64, Vec<f32>)> {
    let mut r = rng(seed);
    (0..n as u64).map(|k| (k, unit_vector(&mut r, dim))).collect()
}

/// An index holding `data`.
pub fn build(dim: u32, data: &[(u64, Vec<f32>)]) -> LibraryIndex {
    let mut idx = LibraryIndex::create(space(dim), IndexParams::default()).expect("create");
    let m = model();
    for (k, v) in data {
        assert!(idx.insert(*k, &m, v).expect("insert"));
    }
    idx
}

pub fn keys(hits: &[suanli_search::Hit]) -> Vec<u64> {
    hits.iter().map(|h| h.key).collect()
}
