//! Who is in the federation: a versioned document listing the members (name, libp2p public
//! key, addresses, region), signed by them.
//!
//! The first version is valid only signed by every member it lists; every later version only
//! as the next version (no gaps: a member that missed changes takes them one by one, each
//! checked against the one before) and signed by a quorum (more than half) of the members of
//! the version it replaces. Joining and leaving are such changes. Without gaps, members voted
//! out long ago cannot sign a far-future version and take over a node that lagged behind. A member's identity is its libp2p key: its peer ID is derived
//! from the public key the document lists, so no one can claim a member's name or ID without
//! its private key.

use std::collections::{BTreeMap, BTreeSet};

use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// The encoding of signed documents and announcements (part of what is signed, so a signature
/// never verifies under another format).
pub const FORMAT: u32 = 1;
/// Most members one document lists.
pub const MAX_MEMBERS: usize = 4096;
const MAX_TEXT: usize = 256;
const MAX_ADDRESSES: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// The member's libp2p public key, protobuf-encoded (its peer ID derives from it).
    pub public_key: Vec<u8>,
    /// Multiaddresses other members reach it at.
    pub addresses: Vec<String>,
    pub region: String,
}

impl Member {
    pub fn new(name: &str, key: &PublicKey, addresses: Vec<String>, region: &str) -> Member {
        Member { name: name.to_owned(), public_key: key.encode_protobuf(), addresses, region: region.to_owned() }
    }

    pub fn key(&self) -> Result<PublicKey, MembershipError> {
        PublicKey::try_decode_protobuf(&self.public_key).map_err(|_| MembershipError::Invalid(format!("{}: not a public key", self.name)))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipDoc {
    /// The federation's name: a document of another federation never replaces this one's.
    pub federation: String,
    pub version: u64,
    pub members: Vec<Member>,
}

/// A document and the signatures over it, by signer peer ID (base58).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedMembership {
    pub doc: MembershipDoc,
    pub signatures: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MembershipError {
    #[error("invalid membership document: {0}")]
    Invalid(String),
    #[error("membership version {version} is signed by {valid} of the {needed} members it needs")]
    NotEnoughSignatures { version: u64, valid: usize, needed: usize },
    #[error("membership version {found} does not follow version {current}")]
    NotNewer { current: u64, found: u64 },
    #[error("membership version {found} skips versions after {current}: take them in order")]
    Gap { current: u64, found: u64 },
    #[error("a membership document of federation {found:?}, not {expected:?}")]
    OtherFederation { expected: String, found: String },
    #[error("encoding: {0}")]
    Encoding(String),
}

impl MembershipDoc {
    /// The bytes a signature covers.
    pub fn signed_bytes(&self) -> Result<Vec<u8>, MembershipError> {
        signed_bytes("membership", self).map_err(|e| MembershipError::Encoding(e.to_string()))
    }

    fn validate(&self) -> Result<BTreeMap<PeerId, (usize, PublicKey)>, MembershipError> {
        let invalid = |why: String| Err(MembershipError::Invalid(why));
        if self.version == 0 {
            return invalid("versions start at 1".into());
        }
        if self.members.is_empty() || self.members.len() > MAX_MEMBERS {
            return invalid(format!("between 1 and {MAX_MEMBERS} members"));
        }
        if self.federation.is_empty() || self.federation.len() > MAX_TEXT {
            return invalid("the federation needs a name".into());
        }
        let mut names = BTreeSet::new();
        let mut keys = BTreeMap::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.name.is_empty() || m.name.len() > MAX_TEXT || m.region.len() > MAX_TEXT || !names.insert(m.name.as_str()) {
                return invalid(format!("member {i}: names are unique, 1 to {MAX_TEXT} bytes"));
            }
            if m.addresses.len() > MAX_ADDRESSES || m.addresses.iter().any(|a| a.parse::<libp2p::Multiaddr>().is_err()) {
                return invalid(format!("{}: at most {MAX_ADDRESSES} multiaddresses", m.name));
            }
            let key = m.key()?;
            if keys.insert(key.to_peer_id(), (i, key)).is_some() {
                return invalid(format!("{}: a key listed twice", m.name));
            }
        }
        Ok(keys)
    }
}

/// The federation's first document and every change since, in order: what a member's node is
/// configured with (each change is checked against the one before).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChain {
    pub genesis: SignedMembership,
    #[serde(default)]
    pub changes: Vec<SignedMembership>,
}

impl MembershipChain {
    /// The membership the chain ends at, every step verified.
    pub fn verify(&self) -> Result<Membership, MembershipError> {
        let mut membership = Membership::genesis(self.genesis.clone())?;
        for change in &self.changes {
            membership = membership.accept(change.clone())?;
        }
        Ok(membership)
    }
}

/// Signs `doc` as `key` (one member's signature).
pub fn sign(doc: &MembershipDoc, key: &Keypair) -> Result<(String, Vec<u8>), MembershipError> {
    let signature = key.sign(&doc.signed_bytes()?).map_err(|e| MembershipError::Encoding(e.to_string()))?;
    Ok((key.public().to_peer_id().to_base58(), signature))
}

/// A verified membership: the document and its members by peer ID.
#[derive(Clone, Debug)]
pub struct Membership {
    signed: SignedMembership,
    members: BTreeMap<PeerId, (usize, PublicKey)>,
}

impl Membership {
    /// The first version: every member it lists must have signed it.
    pub fn genesis(signed: SignedMembership) -> Result<Membership, MembershipError> {
        let members = signed.doc.validate()?;
        let needed = members.len();
        let valid = valid_signatures(&signed, &members)?;
        if valid < needed {
            return Err(MembershipError::NotEnoughSignatures { version: signed.doc.version, valid, needed });
        }
        Ok(Membership { signed, members })
    }

    /// A newer version, signed by more than half of this version's members.
    pub fn accept(&self, next: SignedMembership) -> Result<Membership, MembershipError> {
        if next.doc.federation != self.signed.doc.federation {
            return Err(MembershipError::OtherFederation { expected: self.signed.doc.federation.clone(), found: next.doc.federation });
        }
        if next.doc.version <= self.signed.doc.version {
            return Err(MembershipError::NotNewer { current: self.signed.doc.version, found: next.doc.version });
        }
        if next.doc.version != self.signed.doc.version + 1 {
            return Err(MembershipError::Gap { current: self.signed.doc.version, found: next.doc.version });
        }
        let members = next.doc.validate()?;
        let needed = self.members.len() / 2 + 1;
        let valid = valid_signatures(&next, &self.members)?;
        if valid < needed {
            return Err(MembershipError::NotEnoughSignatures { version: next.doc.version, valid, needed });
        }
        Ok(Membership { signed: next, members })
    }

    pub fn signed(&self) -> &SignedMembership {
        &self.signed
    }

    pub fn version(&self) -> u64 {
        self.signed.doc.version
    }

    pub fn federation(&self) -> &str {
        &self.signed.doc.federation
    }

    pub fn contains(&self, peer: &PeerId) -> bool {
        self.members.contains_key(peer)
    }

    pub fn member(&self, peer: &PeerId) -> Option<&Member> {
        self.members.get(peer).map(|(i, _)| &self.signed.doc.members[*i])
    }

    pub fn key(&self, peer: &PeerId) -> Option<&PublicKey> {
        self.members.get(peer).map(|(_, k)| k)
    }

    pub fn peers(&self) -> impl Iterator<Item = &PeerId> {
        self.members.keys()
    }
}

/// How many of `signers`' keys signed `signed.doc` (signatures by anyone else count nothing).
fn valid_signatures(signed: &SignedMembership, signers: &BTreeMap<PeerId, (usize, PublicKey)>) -> Result<usize, MembershipError> {
    let bytes = signed.doc.signed_bytes()?;
    Ok(signed
        .signatures
        .iter()
        .filter(|(peer, signature)| peer.parse::<PeerId>().ok().and_then(|p| signers.get(&p)).is_some_and(|(_, key)| key.verify(&bytes, signature)))
        .count())
}

/// Domain-separated bytes to sign: `suanli-federation/<kind>/<FORMAT>` then the postcard
/// encoding.
pub(crate) fn signed_bytes<T: Serialize>(kind: &str, value: &T) -> Result<Vec<u8>, postcard::Error> {
    let mut bytes = format!("suanli-federation/{kind}/{FORMAT}\0").into_bytes();
    bytes.extend(postcard::to_allocvec(value)?);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(version: u64, keys: &[&Keypair]) -> MembershipDoc {
        let members =
            keys.iter().enumerate().map(|(i, k)| Member::new(&format!("m{i}"), &k.public(), vec!["/ip4/127.0.0.1/tcp/1".into()], "cn-north")).collect();
        MembershipDoc { federation: "test".into(), version, members }
    }

    fn signed(doc: MembershipDoc, by: &[&Keypair]) -> SignedMembership {
        let signatures = by.iter().map(|k| sign(&doc, k).expect("sign")).collect();
        SignedMembership { doc, signatures }
    }

    #[test]
    fn the_first_version_needs_every_members_signature() {
        let (a, b, c) = (Keypair::generate_ed25519(), Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let d = doc(1, &[&a, &b, &c]);
        assert!(matches!(Membership::genesis(signed(d.clone(), &[&a, &b])), Err(MembershipError::NotEnoughSignatures { valid: 2, needed: 3, .. })));
        let m = Membership::genesis(signed(d, &[&a, &b, &c])).expect("all signed");
        assert!(m.contains(&a.public().to_peer_id()));
    }

    #[test]
    fn a_change_needs_a_quorum_of_the_current_members_and_an_outsider_cannot_add_itself() {
        let (a, b, c, x) = (Keypair::generate_ed25519(), Keypair::generate_ed25519(), Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let current = Membership::genesis(signed(doc(1, &[&a, &b, &c]), &[&a, &b, &c])).expect("genesis");
        let joined = doc(2, &[&a, &b, &c, &x]);
        // The newcomer's own signature and one member's are not a quorum of three.
        let refused = current.accept(signed(joined.clone(), &[&x, &a]));
        assert!(matches!(refused, Err(MembershipError::NotEnoughSignatures { valid: 1, needed: 2, .. })));
        let next = current.accept(signed(joined.clone(), &[&a, &b])).expect("two of three");
        assert!(next.contains(&x.public().to_peer_id()));
        // Replayed or older versions are refused.
        assert!(matches!(next.accept(signed(joined, &[&a, &b, &c, &x])), Err(MembershipError::NotNewer { .. })));
    }

    #[test]
    fn a_version_that_skips_ahead_is_refused_even_with_every_signature() {
        let (a, b, c) = (Keypair::generate_ed25519(), Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let current = Membership::genesis(signed(doc(1, &[&a, &b, &c]), &[&a, &b, &c])).expect("genesis");
        // A quorum of version 1 signing "version u64::MAX" (as members voted out later could).
        let far = current.accept(signed(doc(u64::MAX, &[&a, &b]), &[&a, &b, &c]));
        assert!(matches!(far, Err(MembershipError::Gap { current: 1, .. })));
        assert!(current.accept(signed(doc(2, &[&a, &b]), &[&a, &b])).is_ok());
    }

    #[test]
    fn a_signature_over_another_document_does_not_count() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let d = doc(1, &[&a, &b]);
        let mut s = signed(d, &[&a, &b]);
        s.doc.members[1].region = "elsewhere".into();
        assert!(matches!(Membership::genesis(s), Err(MembershipError::NotEnoughSignatures { valid: 0, .. })));
    }

    #[test]
    fn malformed_documents_are_refused_with_the_reason() {
        let a = Keypair::generate_ed25519();
        let mut d = doc(1, &[&a, &a]);
        d.members[1].name = "other".into();
        assert!(matches!(Membership::genesis(signed(d, &[&a])), Err(MembershipError::Invalid(why)) if why.contains("twice")));
        let mut d = doc(1, &[&a]);
        d.members[0].public_key = vec![1, 2, 3];
        assert!(matches!(Membership::genesis(signed(d, &[&a])), Err(MembershipError::Invalid(_))));
        let mut d = doc(1, &[&a]);
        d.members[0].addresses = vec!["not an address".into()];
        assert!(matches!(Membership::genesis(signed(d, &[&a])), Err(MembershipError::Invalid(_))));
        assert!(matches!(Membership::genesis(signed(doc(0, &[&a]), &[&a])), Err(MembershipError::Invalid(_))));
    }
}
