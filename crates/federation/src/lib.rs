//! Federation of independent marketplaces (DESIGN.md, Scale): each member runs its own broker
//! cluster and keeps its own suppliers, accounts and money; members share one catalogue over
//! libp2p.
//!
//! - [`membership`]: who is in the federation, a versioned document signed by its members;
//! - [`catalogue`]: each member's signed, versioned offer and the merged catalogue;
//! - [`calls`]: what members ask each other directly (leases across members, their access,
//!   ends and signed settlements);
//! - [`keyfile`]: a member's key on disk;
//! - [`node`]: the libp2p node that carries both (members only, gossip checked before it is
//!   relayed, anti-entropy so a lost message heals).
//!
//! This crate is the only one that knows libp2p.

pub mod calls;
pub mod catalogue;
pub mod keyfile;
pub mod membership;
pub mod node;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod golden_tests;

pub use calls::{AccessNode, Answer, Call, Settlement, SignedSettlement};
pub use catalogue::{FederatedListing, Freshness, ListingDigest};
pub use libp2p::identity::Keypair;
pub use libp2p::multiaddr::Error as MultiaddrError;
pub use libp2p::{Multiaddr, PeerId};
pub use membership::{Member, Membership, MembershipChain, MembershipDoc, SignedMembership};
pub use node::{FederationNode, IncomingCall, NodeConfig, NodeError, TransportKind};
