//! Agents and card health: enrollment with one-time tokens, reinstalls that keep a node's
//! history, revocation, and what monitoring concludes about each card.

use std::collections::{BTreeMap, BTreeSet};

use suanli_types::error::EntityKind;
use suanli_types::{AccountId, AccountKind, Caller, CardHealth, CardId, CardStatus, DomainError, NodeAccess, NodeId, NodeInventory, SecretHash, Timestamp};

use super::{rules, Outcome, Response, State};
use crate::state::event::Event;
use crate::state::model::{Card, EnrollmentToken, Node};

impl State {
    /// Adds a new node and its cards, all idle and healthy.
    pub(super) fn add_node(&mut self, supplier: AccountId, inventory: &NodeInventory, at: Timestamp, events: &mut Vec<Event>) -> NodeId {
        let node = NodeId(self.next());
        let cards: Vec<CardId> = inventory.cards.iter().map(|spec| self.add_card(node, spec.clone())).collect();
        self.nodes.insert(
            node,
            Node {
                id: node,
                supplier,
                inventory: inventory.clone(),
                cards: cards.clone(),
                cluster: None,
                enrolled_at: at,
                agent_credential: None,
                access: None,
            },
        );
        events.push(Event::NodeEnrolled { node, supplier, cards });
        node
    }

    fn add_card(&mut self, node: NodeId, spec: suanli_types::CardSpec) -> CardId {
        let id = CardId(self.next());
        let card = Card { id, node, spec, status: CardStatus::Idle, lease: None, health: CardHealth::Healthy };
        self.cards.insert(id, card);
        id
    }

    pub(super) fn issue_enrollment_token(&mut self, caller: &Caller, token_hash: SecretHash, expires_at: Timestamp, at: Timestamp) -> Outcome {
        let supplier = self.account_of_kind(caller, AccountKind::Supplier)?;
        if expires_at <= at || expires_at.seconds_since(at) > rules::ENROLLMENT_TOKEN_MAX_SECONDS {
            return Err(DomainError::invalid("valid_seconds", format!("between 1 and {} seconds", rules::ENROLLMENT_TOKEN_MAX_SECONDS)));
        }
        if self.enrollment_tokens.contains_key(&token_hash) {
            return Err(DomainError::AlreadyExists { kind: EntityKind::Node, id: "enrollment token".into() });
        }
        // Tokens that can no longer be used are only kept while a retry could ask about them.
        let horizon = rules::REQUEST_ID_RETENTION_SECONDS;
        self.enrollment_tokens.retain(|_, t| at.seconds_since(t.expires_at) < horizon);
        self.enrollment_tokens.insert(token_hash, EnrollmentToken { supplier, expires_at, used_by: None });
        Ok(Response::Empty)
    }

    pub(super) fn enroll_agent(
        &mut self,
        token_hash: &SecretHash,
        credential_hash: &SecretHash,
        inventory: &NodeInventory,
        at: Timestamp,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let token = self
            .enrollment_tokens
            .get(token_hash)
            .filter(|t| t.used_by.is_none() && t.expires_at > at)
            .ok_or_else(|| DomainError::Unauthenticated("enrollment token unknown, already used or expired".into()))?;
        let supplier = token.supplier;
        inventory.validate()?;
        if self.nodes_by_credential.contains_key(credential_hash) {
            return Err(DomainError::AlreadyExists { kind: EntityKind::Node, id: "agent credential".into() });
        }
        let reinstalled = self.reinstalled_node(supplier, inventory);
        let node = match reinstalled {
            Some(node) => {
                self.reenroll(node, inventory, at, events)?;
                node
            }
            None => self.add_node(supplier, inventory, at, events),
        };
        if let Some(n) = self.nodes.get_mut(&node) {
            if let Some(old) = n.agent_credential.replace(*credential_hash) {
                self.nodes_by_credential.remove(&old);
            }
        }
        self.nodes_by_credential.insert(*credential_hash, node);
        if let Some(t) = self.enrollment_tokens.get_mut(token_hash) {
            t.used_by = Some(node);
        }
        events.push(Event::AgentEnrolled { node, supplier, reenrolled: reinstalled.is_some() });
        Ok(Response::Node(Box::new(self.nodes[&node].clone())))
    }

    /// A node of `supplier` that is the same machine: it shares a card UUID (hardware
    /// identity survives a reinstall) or, for a node without cards, the hostname.
    fn reinstalled_node(&self, supplier: AccountId, inventory: &NodeInventory) -> Option<NodeId> {
        let uuids: BTreeSet<&str> = inventory.cards.iter().map(|c| c.uuid.as_str()).collect();
        self.nodes
            .values()
            .filter(|n| n.supplier == supplier)
            .find(|n| {
                n.inventory.cards.iter().any(|c| uuids.contains(c.uuid.as_str()))
                    || (uuids.is_empty() && n.inventory.cards.is_empty() && n.inventory.hostname == inventory.hostname)
            })
            .map(|n| n.id)
    }

    /// Takes a reinstalled node's new inventory: cards keep their IDs by UUID, new cards are
    /// added, and cards that are gone stay on record as lost (past leases name them). Refused,
    /// changing nothing, if a card that is gone is held by a live lease.
    fn reenroll(&mut self, node: NodeId, inventory: &NodeInventory, at: Timestamp, events: &mut Vec<Event>) -> Result<(), DomainError> {
        let old_cards = self.nodes.get(&node).map(|n| n.cards.clone()).unwrap_or_default();
        let by_uuid: BTreeMap<String, CardId> = old_cards.iter().filter_map(|id| self.cards.get(id).map(|c| (c.spec.uuid.clone(), *id))).collect();
        let kept: BTreeSet<&str> = inventory.cards.iter().map(|c| c.uuid.as_str()).collect();
        for (uuid, id) in &by_uuid {
            if let Some(c) = self.cards.get(id).filter(|c| c.lease.is_some() && !kept.contains(uuid.as_str())) {
                return Err(DomainError::CardUnavailable { card: *id, status: c.status });
            }
        }
        let mut cards = Vec::with_capacity(inventory.cards.len());
        for spec in &inventory.cards {
            match by_uuid.get(&spec.uuid) {
                Some(id) => {
                    if let Some(c) = self.cards.get_mut(id) {
                        c.spec = spec.clone();
                    }
                    cards.push(*id);
                }
                None => cards.push(self.add_card(node, spec.clone())),
            }
        }
        let gone: Vec<(CardId, CardHealth)> = by_uuid.iter().filter(|(uuid, _)| !kept.contains(uuid.as_str())).map(|(_, id)| (*id, CardHealth::Lost)).collect();
        self.apply_health(&gone, at, events);
        let mut cluster = None;
        if let Some(n) = self.nodes.get_mut(&node) {
            n.inventory = inventory.clone();
            n.cards = cards;
            cluster = n.cluster;
        }
        if let Some(cluster) = cluster {
            self.recount_cluster(cluster);
        }
        Ok(())
    }

    pub(super) fn revoke_agent(&mut self, node: NodeId, events: &mut Vec<Event>) -> Outcome {
        let n = self.nodes.get_mut(&node).ok_or(DomainError::not_found(EntityKind::Node, node))?;
        if let Some(old) = n.agent_credential.take() {
            self.nodes_by_credential.remove(&old);
            events.push(Event::AgentRevoked { node });
        }
        Ok(Response::Node(Box::new(self.nodes[&node].clone())))
    }

    /// The node's own agent says where its access gateway listens.
    pub(super) fn set_node_access(&mut self, node: NodeId, access: &NodeAccess) -> Outcome {
        let n = self.nodes.get_mut(&node).ok_or(DomainError::not_found(EntityKind::Node, node))?;
        n.access = Some(access.clone());
        Ok(Response::Node(Box::new(n.clone())))
    }

    pub(super) fn set_card_health(&mut self, changes: &[(CardId, CardHealth)], at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        if let Some((missing, _)) = changes.iter().find(|(card, _)| !self.cards.contains_key(card)) {
            return Err(DomainError::not_found(EntityKind::Card, missing));
        }
        self.apply_health(changes, at, events);
        Ok(Response::Empty)
    }

    /// Records each card's new health. A card without a lease follows it into the market or
    /// out of it: unhealthy → offline or faulty; healthy again → idle. A leased card keeps its
    /// lease: the fault is on record for the lessee.
    fn apply_health(&mut self, changes: &[(CardId, CardHealth)], at: Timestamp, events: &mut Vec<Event>) {
        for &(card, to) in changes {
            let Some(c) = self.cards.get_mut(&card) else { continue };
            let from = c.health;
            if from == to {
                continue;
            }
            c.health = to;
            events.push(Event::CardHealthChanged { card, from, to });
            self.note_card_health(card, to, at, events);
            let Some(c) = self.cards.get(&card) else { continue };
            let status = c.status;
            let outside_market = matches!(status, CardStatus::Offline | CardStatus::Faulty);
            if c.lease.is_none() && (status == CardStatus::Idle || outside_market) {
                let next = if to == CardHealth::Healthy && from != CardHealth::Healthy && outside_market { CardStatus::Idle } else { to.idle_status() };
                self.set_card(card, next, None, events);
            }
        }
    }
}
