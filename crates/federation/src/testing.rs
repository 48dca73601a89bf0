//! Samples for tests, benchmarks and simulations (feature `testing`): one listing, and a
//! federation founded by keys that all sign its first document.

use std::collections::BTreeMap;

use libp2p::identity::Keypair;

use crate::catalogue::ListingDigest;
use crate::membership::{sign, Member, MembershipDoc, SignedMembership};

/// A Class B 8×H100 listing in cn-north at 25.00 CNY an hour, with `free_cards` of 8 free.
pub fn listing(cluster_id: u64, free_cards: u32) -> ListingDigest {
    ListingDigest {
        cluster_id,
        class: "B".into(),
        title: "8*H100".into(),
        gpu_model: "H100".into(),
        vram_gib: 80,
        region: "cn-north".into(),
        total_cards: 8,
        free_cards,
        currency: "CNY".into(),
        prices: BTreeMap::from([("hourly".into(), 2_500)]),
    }
}

/// The first membership document of `federation` listing `members` (name and key, no
/// addresses, all in `region`), signed by every one of them.
pub fn founded(federation: &str, members: &[(&str, &Keypair)], region: &str) -> SignedMembership {
    let doc = MembershipDoc {
        federation: federation.into(),
        version: 1,
        members: members.iter().map(|(name, key)| Member::new(name, &key.public(), vec![], region)).collect(),
    };
    let signatures = members.iter().map(|(_, key)| sign(&doc, key).expect("an ed25519 key signs")).collect();
    SignedMembership { doc, signatures }
}
