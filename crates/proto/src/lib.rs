//! The wire contracts: code generated from `proto/suanli/v1`, conversions between wire and
//! domain types, and the one mapping of domain errors onto gRPC statuses.
//!
//! Architecture invariant: this is the only crate that knows protobuf. Services convert at
//! their edge and work with `suanli-types` inside.

pub mod client;
pub mod convert;
pub mod error;

/// Generated from `proto/suanli/v1` and checked in (`tests/generated.rs` keeps it current).
#[allow(clippy::all, clippy::unwrap_used)]
pub mod v1 {
    include!("gen/suanli.v1.rs");
}

pub use error::{decode_status, to_status, ApiError};
