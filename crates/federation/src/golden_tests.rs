//! The federation's wire format, pinned: members of different versions exchange these bytes.
//! A gossip message (`node::Wire`: format, then an announcement or a membership document) and
//! the bytes each signature covers are postcard encodings of fixed samples (ed25519 signatures
//! are deterministic), compared with `crates/federation/formats/v<FORMAT>/wire.txt`. A failure
//! means the encoding changed: bump `membership::FORMAT`, keep the old file, and keep reading
//! the old format while members still send it. `SUANLI_REGENERATE=1` writes the file (for a
//! new format only).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use libp2p::identity::Keypair;

use crate::catalogue::{Announcement, ListingDigest, SignedAnnouncement};
use crate::membership::{sign, Member, MembershipDoc, SignedMembership, FORMAT};
use crate::node::{Gossip, Wire};

fn key(seed: u8) -> Keypair {
    Keypair::ed25519_from_bytes([seed; 32]).expect("key")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn samples() -> Vec<(&'static str, Vec<u8>)> {
    let (a, b) = (key(1), key(2));
    let doc = MembershipDoc {
        federation: "golden".into(),
        version: 1,
        members: vec![
            Member::new("city", &a.public(), vec!["/ip4/10.0.0.1/tcp/4001".into()], "cn-north"),
            Member::new("university", &b.public(), vec![], "cn-east"),
        ],
    };
    let membership = SignedMembership { signatures: [sign(&doc, &a).expect("sign"), sign(&doc, &b).expect("sign")].into_iter().collect(), doc };
    let announcement = Announcement {
        member: a.public().to_peer_id().to_base58(),
        version: 1_800_000_000_001,
        issued_at_ms: 1_800_000_000_000,
        listings: vec![ListingDigest {
            cluster_id: 6,
            class: "B".into(),
            title: "4*L40S".into(),
            gpu_model: "L40S".into(),
            vram_gib: 48,
            region: "cn-north".into(),
            total_cards: 4,
            free_cards: 3,
            currency: "CNY".into(),
            prices: BTreeMap::from([("hourly".into(), 600), ("monthly".into(), 300_000)]),
        }],
    };
    let signed = SignedAnnouncement::sign(announcement.clone(), &a).expect("sign");
    let wire = |gossip| postcard::to_allocvec(&Wire { format: FORMAT, gossip }).expect("encode");
    vec![
        ("membership-signed-bytes", membership.doc.signed_bytes().expect("bytes")),
        ("announcement-signed-bytes", crate::membership::signed_bytes("announcement", &announcement).expect("bytes")),
        ("gossip-membership", wire(Gossip::Membership(membership))),
        ("gossip-announcement", wire(Gossip::Announcement(signed))),
    ]
}

#[test]
fn the_federation_wire_keeps_its_bytes_and_reads_back() {
    let now: String = samples().iter().map(|(name, bytes)| format!("{name} {}\n", hex(bytes))).collect();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("formats").join(format!("v{FORMAT}"));
    let path = dir.join("wire.txt");
    if std::env::var("SUANLI_REGENERATE").as_deref() == Ok("1") {
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(&path, &now).expect("write");
    }
    let pinned = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for (was, is) in pinned.lines().zip(now.lines()) {
        assert_eq!(was, is, "the federation's wire encoding changed: bump membership::FORMAT and keep reading the old one");
    }
    assert_eq!(pinned.lines().count(), now.lines().count());
    // What is pinned decodes as a message this code accepts.
    for line in pinned.lines().filter(|l| l.starts_with("gossip-")) {
        let bytes = ::hex::decode(line.split_once(' ').expect("line").1).expect("hex");
        let wire: Wire = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(wire.format, FORMAT);
    }
}
