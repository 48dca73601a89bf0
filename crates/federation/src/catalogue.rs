//! The federated catalogue: each member announces a signed, versioned digest of its listings;
//! every member merges what it receives into one catalogue tagged with each listing's origin
//! and age.
//!
//! An announcement is the member's whole offer (versioned state, not a delta), so applying one
//! is idempotent and order does not matter: the highest version wins. Gossip carries
//! announcements; anti-entropy (a version vector sent to a peer, answered with every
//! announcement newer than it) heals what gossip lost. A listing not refreshed for
//! [`Freshness::stale_after`] is marked stale, after [`Freshness::hide_after`] hidden.

use std::collections::BTreeMap;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::membership::{signed_bytes, Membership};

/// Most listings one announcement carries.
pub const MAX_LISTINGS: usize = 10_000;
/// Longest text field of a listing, in bytes.
pub const MAX_TEXT: usize = 256;
/// Most prices (billing modes) one listing states.
pub const MAX_PRICES: usize = 16;
/// How far a member's clock may be behind this one's before its announcement's age (by its
/// own `issued_at_ms`) counts against it.
pub const CLOCK_TOLERANCE_MS: i64 = 60_000;

/// One listing as the federation sees it: what a researcher searches by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListingDigest {
    /// The cluster's ID in its own member's broker.
    pub cluster_id: u64,
    /// "A" or "B" (SPEC's classes).
    pub class: String,
    pub title: String,
    pub gpu_model: String,
    pub vram_gib: u32,
    pub region: String,
    pub total_cards: u32,
    pub free_cards: u32,
    pub currency: String,
    /// Price per card per billing period, by mode ("hourly", "daily", ...), in minor units.
    pub prices: BTreeMap<String, i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The announcing member's peer ID (base58).
    pub member: String,
    /// Grows with every announcement of the member (a re-announcement of the same offer too).
    pub version: u64,
    /// The member's clock when it announced (reported, not trusted for ordering).
    pub issued_at_ms: i64,
    pub listings: Vec<ListingDigest>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAnnouncement {
    pub announcement: Announcement,
    pub signature: Vec<u8>,
}

impl SignedAnnouncement {
    pub fn sign(announcement: Announcement, key: &Keypair) -> Result<SignedAnnouncement, Refused> {
        let bytes = signed_bytes("announcement", &announcement).map_err(|_| Refused::Malformed)?;
        let signature = key.sign(&bytes).map_err(|_| Refused::Malformed)?;
        Ok(SignedAnnouncement { announcement, signature })
    }
}

/// Why a received announcement was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("not from a member of the federation")]
    NotAMember,
    #[error("the signature is not the member's")]
    BadSignature,
    #[error("malformed")]
    Malformed,
    #[error("more than {MAX_LISTINGS} listings")]
    TooLarge,
    #[error("a listing field is longer than {MAX_TEXT} bytes, or states more than {MAX_PRICES} prices")]
    FieldTooLong,
}

impl ListingDigest {
    fn check(&self) -> Result<(), Refused> {
        let texts = [&self.class, &self.title, &self.gpu_model, &self.region, &self.currency];
        let too_long = texts.iter().any(|t| t.len() > MAX_TEXT) || self.prices.len() > MAX_PRICES || self.prices.keys().any(|k| k.len() > MAX_TEXT);
        if too_long {
            Err(Refused::FieldTooLong)
        } else {
            Ok(())
        }
    }
}

/// How old a member's latest announcement may be before its listings are marked stale, and
/// then hidden.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freshness {
    pub stale_after: Duration,
    pub hide_after: Duration,
}

impl Default for Freshness {
    fn default() -> Self {
        Freshness { stale_after: Duration::from_secs(30), hide_after: Duration::from_secs(120) }
    }
}

/// A listing in the merged catalogue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FederatedListing {
    pub origin: PeerId,
    pub origin_name: String,
    /// Since this member's offer was last confirmed (an announcement received).
    pub age: Duration,
    pub stale: bool,
    pub listing: ListingDigest,
}

/// What applying an announcement did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Newer than what was known: it replaced it.
    Newer,
    /// Already known, or older (a replay): nothing changed.
    Known,
    /// Issued longer ago than an offer is shown (by the issuer's clock, with a tolerance): a
    /// gone member's last word relayed late is not news. Not stored, not relayed.
    Expired,
}

struct Entry {
    signed: SignedAnnouncement,
    /// Local time it was received (milliseconds since an arbitrary origin the caller keeps).
    received_ms: u64,
}

#[derive(Default)]
pub struct Catalogue {
    entries: BTreeMap<PeerId, Entry>,
}

impl Catalogue {
    /// Checks and merges an announcement received at local time `now_ms` (monotonic, for
    /// ages) and wall-clock time `wall_ms`, keeping offers for `freshness`.
    pub fn apply(&mut self, membership: &Membership, signed: SignedAnnouncement, now_ms: u64, wall_ms: i64, freshness: Freshness) -> Result<Applied, Refused> {
        let member: PeerId = signed.announcement.member.parse().map_err(|_| Refused::Malformed)?;
        let key = membership.key(&member).ok_or(Refused::NotAMember)?;
        if signed.announcement.listings.len() > MAX_LISTINGS {
            return Err(Refused::TooLarge);
        }
        signed.announcement.listings.iter().try_for_each(ListingDigest::check)?;
        let bytes = signed_bytes("announcement", &signed.announcement).map_err(|_| Refused::Malformed)?;
        if !key.verify(&bytes, &signed.signature) {
            return Err(Refused::BadSignature);
        }
        let issued_ago = wall_ms.saturating_sub(signed.announcement.issued_at_ms);
        let shown_for = i64::try_from(freshness.hide_after.as_millis()).unwrap_or(i64::MAX);
        if issued_ago > shown_for.saturating_add(CLOCK_TOLERANCE_MS) {
            return Ok(Applied::Expired);
        }
        match self.entries.get(&member) {
            Some(known) if known.signed.announcement.version >= signed.announcement.version => Ok(Applied::Known),
            _ => {
                self.entries.insert(member, Entry { signed, received_ms: now_ms });
                Ok(Applied::Newer)
            }
        }
    }

    /// The latest version known of each member's offer.
    pub fn versions(&self) -> BTreeMap<String, u64> {
        self.entries.iter().map(|(peer, e)| (peer.to_base58(), e.signed.announcement.version)).collect()
    }

    /// The announcements newer than what `theirs` knows (what anti-entropy sends back), not
    /// hidden at local time `now_ms`, starting at the `start`-th member (callers rotate it, so
    /// an answer that fills its budget does not always send the same ones), until about
    /// `budget` encoded bytes.
    pub fn newer_than(&self, theirs: &BTreeMap<String, u64>, now_ms: u64, freshness: Freshness, start: usize, budget: usize) -> Vec<SignedAnnouncement> {
        let len = self.entries.len().max(1);
        let mut out = Vec::new();
        let mut used: usize = 0;
        for (peer, e) in self.entries.iter().cycle().skip(start % len).take(self.entries.len()) {
            let wanted = theirs.get(&peer.to_base58()).is_none_or(|v| *v < e.signed.announcement.version);
            let shown = u128::from(now_ms.saturating_sub(e.received_ms)) < freshness.hide_after.as_millis();
            if !(wanted && shown) {
                continue;
            }
            let size = postcard::experimental::serialized_size(&e.signed).unwrap_or(usize::MAX);
            if used.saturating_add(size) > budget && !out.is_empty() {
                break;
            }
            if size <= budget {
                used += size;
                out.push(e.signed.clone());
            }
        }
        out
    }

    /// Drops the offers of peers no longer members.
    pub fn retain_members(&mut self, membership: &Membership) {
        self.entries.retain(|peer, _| membership.contains(peer));
    }

    /// The merged catalogue at local time `now_ms`: hidden offers left out, stale ones marked.
    pub fn listings(&self, membership: &Membership, freshness: Freshness, now_ms: u64) -> Vec<FederatedListing> {
        let mut out = Vec::new();
        for (peer, e) in &self.entries {
            let age = Duration::from_millis(now_ms.saturating_sub(e.received_ms));
            if age >= freshness.hide_after {
                continue;
            }
            let origin_name = membership.member(peer).map(|m| m.name.clone()).unwrap_or_default();
            for listing in &e.signed.announcement.listings {
                out.push(FederatedListing {
                    origin: *peer,
                    origin_name: origin_name.clone(),
                    age,
                    stale: age >= freshness.stale_after,
                    listing: listing.clone(),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{founded, listing};

    fn federation(keys: &[&Keypair]) -> Membership {
        let names: Vec<String> = (0..keys.len()).map(|i| format!("m{i}")).collect();
        let named: Vec<(&str, &Keypair)> = names.iter().map(String::as_str).zip(keys.iter().copied()).collect();
        Membership::genesis(founded("test", &named, "cn")).expect("genesis")
    }

    /// The wall clock the tests' announcements are issued and received at.
    const WALL: i64 = 1_800_000_000_000;
    const F: Freshness = Freshness { stale_after: Duration::from_secs(30), hide_after: Duration::from_secs(120) };

    fn announce(key: &Keypair, version: u64, listings: Vec<ListingDigest>) -> SignedAnnouncement {
        let a = Announcement { member: key.public().to_peer_id().to_base58(), version, issued_at_ms: WALL, listings };
        SignedAnnouncement::sign(a, key).expect("sign")
    }

    #[test]
    fn the_newest_version_wins_and_a_replay_changes_nothing() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let m = federation(&[&a, &b]);
        let mut c = Catalogue::default();
        assert_eq!(c.apply(&m, announce(&a, 2, vec![listing(1, 3)]), 0, WALL, F), Ok(Applied::Newer));
        assert_eq!(c.apply(&m, announce(&a, 1, vec![listing(1, 8)]), 10, WALL, F), Ok(Applied::Known), "an older version");
        assert_eq!(c.apply(&m, announce(&a, 2, vec![listing(1, 3)]), 10, WALL, F), Ok(Applied::Known), "a replay");
        let seen = c.listings(&m, Freshness::default(), 10);
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].listing.free_cards, seen[0].origin_name.as_str()), (3, "m0"));
    }

    #[test]
    fn forged_and_outsider_announcements_are_refused_and_change_nothing() {
        let (a, b, outsider) = (Keypair::generate_ed25519(), Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let m = federation(&[&a, &b]);
        let mut c = Catalogue::default();
        c.apply(&m, announce(&a, 1, vec![listing(1, 3)]), 0, WALL, F).expect("a's own");
        // B signs an announcement claiming to be A's.
        let mut forged = announce(&b, 5, vec![listing(1, 0)]);
        forged.announcement.member = a.public().to_peer_id().to_base58();
        assert_eq!(c.apply(&m, forged, 1, WALL, F), Err(Refused::BadSignature));
        // A's real announcement, altered on the way.
        let mut altered = announce(&a, 6, vec![listing(1, 3)]);
        altered.announcement.listings[0].free_cards = 8;
        assert_eq!(c.apply(&m, altered, 1, WALL, F), Err(Refused::BadSignature));
        assert_eq!(c.apply(&m, announce(&outsider, 1, vec![listing(9, 9)]), 1, WALL, F), Err(Refused::NotAMember));
        let seen = c.listings(&m, Freshness::default(), 1);
        assert_eq!(seen.iter().map(|l| (l.listing.cluster_id, l.listing.free_cards)).collect::<Vec<_>>(), vec![(1, 3)]);
    }

    #[test]
    fn an_offer_not_confirmed_goes_stale_then_hidden_and_returns_when_announced_again() {
        let a = Keypair::generate_ed25519();
        let m = federation(&[&a]);
        let mut c = Catalogue::default();
        let f = Freshness { stale_after: Duration::from_secs(30), hide_after: Duration::from_secs(120) };
        c.apply(&m, announce(&a, 1, vec![listing(1, 3)]), 0, WALL, f).expect("apply");
        assert!(!c.listings(&m, f, 29_999)[0].stale);
        assert!(c.listings(&m, f, 30_000)[0].stale);
        assert!(c.listings(&m, f, 120_000).is_empty());
        c.apply(&m, announce(&a, 2, vec![listing(1, 3)]), 130_000, WALL, F).expect("apply");
        assert_eq!(c.listings(&m, f, 130_001).len(), 1, "back, once, not duplicated");
    }

    #[test]
    fn anti_entropy_sends_exactly_what_the_other_side_lacks() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let m = federation(&[&a, &b]);
        let mut c = Catalogue::default();
        c.apply(&m, announce(&a, 3, vec![listing(1, 3)]), 0, WALL, F).expect("apply");
        c.apply(&m, announce(&b, 1, vec![listing(2, 1)]), 0, WALL, F).expect("apply");
        let theirs = BTreeMap::from([(a.public().to_peer_id().to_base58(), 3)]);
        let sent = c.newer_than(&theirs, 0, F, 0, usize::MAX);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].announcement.member, b.public().to_peer_id().to_base58());
        let mut other = Catalogue::default();
        for s in c.newer_than(&BTreeMap::new(), 0, F, 0, usize::MAX) {
            other.apply(&m, s, 0, WALL, F).expect("apply");
        }
        assert_eq!(other.versions(), c.versions());
        // A budget for one sends one, and rotating the start sends the other.
        let one =
            c.newer_than(&BTreeMap::new(), 0, F, 0, usize::MAX).iter().map(|s| postcard::experimental::serialized_size(s).expect("size")).max().expect("two");
        let first = c.newer_than(&BTreeMap::new(), 0, F, 0, one + 1);
        let second = c.newer_than(&BTreeMap::new(), 0, F, 1, one + 1);
        assert_eq!((first.len(), second.len()), (1, 1));
        assert_ne!(first[0].announcement.member, second[0].announcement.member);
        // Hidden offers are not served.
        assert!(c.newer_than(&BTreeMap::new(), 120_000, F, 0, usize::MAX).is_empty());
    }

    #[test]
    fn an_offer_issued_long_ago_or_with_oversized_fields_is_not_taken() {
        let a = Keypair::generate_ed25519();
        let m = federation(&[&a]);
        let mut c = Catalogue::default();
        // A gone member's last announcement, relayed late: older than hide_after + tolerance.
        let late = WALL + F.hide_after.as_millis() as i64 + CLOCK_TOLERANCE_MS + 1;
        assert_eq!(c.apply(&m, announce(&a, 1, vec![listing(1, 3)]), 0, late, F), Ok(Applied::Expired));
        assert!(c.listings(&m, F, 0).is_empty());
        let mut long = listing(1, 3);
        long.title = "x".repeat(MAX_TEXT + 1);
        assert_eq!(c.apply(&m, announce(&a, 2, vec![long]), 0, WALL, F), Err(Refused::FieldTooLong));
        assert!(c.versions().is_empty());
    }
}
