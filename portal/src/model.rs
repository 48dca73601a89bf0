//! The portal's own vocabulary: who people are, what state their account is in, what roles they
//! hold and what each role may do (RBAC down to module and data level, SPEC §1).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A portal user ID (random, 63 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserId(pub i64);

macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
        pub enum $name { $(#[serde(rename = $text)] $variant,)* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }
            pub fn parse(s: &str) -> Option<$name> {
                match s { $($text => Some($name::$variant),)* _ => None }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

text_enum!(
    /// Which side of the market a person is on.
    UserKind { Researcher = "researcher", Supplier = "supplier", Operator = "operator" }
);

text_enum!(
    /// SPEC §1: researchers are personal, university, institute or enterprise users; suppliers
    /// are enterprises or individuals; operators are platform staff.
    UserType { Personal = "personal", University = "university", Institute = "institute", Enterprise = "enterprise", Individual = "individual", Staff = "staff" }
);

text_enum!(
    /// Who may reach a service on leased cards (`services.rs`): its owner only, anyone with its
    /// link (its origin's random name), or anyone (and it is listed).
    ServiceVisibility { Private = "private", Link = "link", Public = "public" }
);

text_enum!(
    /// What a service on leased cards is (`services.rs`): a model's demo, a terminal, JupyterLab.
    ServiceKindName { ClassifierDemo = "classifier_demo", Terminal = "terminal", Jupyter = "jupyter" }
);

impl ServiceKindName {
    /// A shell or a notebook as the lease's account is its owner's alone: never shared.
    pub fn private_only(self) -> bool {
        matches!(self, ServiceKindName::Terminal | ServiceKindName::Jupyter)
    }

    /// An environment (a shell, a notebook) stops when nobody has used it for a while; a demo
    /// runs for its visitors until its owner stops it or its lease ends.
    pub fn stops_when_idle(self) -> bool {
        matches!(self, ServiceKindName::Terminal | ServiceKindName::Jupyter)
    }

    /// Whether the portal serves the service's front page itself (the rest of its origin is
    /// the service's).
    pub fn has_portal_pages(self) -> bool {
        matches!(self, ServiceKindName::ClassifierDemo | ServiceKindName::Terminal)
    }
}

text_enum!(
    AccountState {
        PendingActivation = "pending_activation",
        PendingReview = "pending_review",
        Active = "active",
        Rejected = "rejected",
        Deregistered = "deregistered",
    }
);

impl UserType {
    /// Which types each kind may register as.
    pub fn allowed_for(self, kind: UserKind) -> bool {
        match kind {
            UserKind::Researcher => matches!(self, UserType::Personal | UserType::University | UserType::Institute | UserType::Enterprise),
            UserKind::Supplier => matches!(self, UserType::Enterprise | UserType::Individual),
            UserKind::Operator => self == UserType::Staff,
        }
    }
    /// Organisation accounts submit a licence and wait for an operator's review.
    pub fn is_organisation(self) -> bool {
        matches!(self, UserType::University | UserType::Institute | UserType::Enterprise)
    }
}

/// Operator roles of SPEC §1 (researchers and suppliers hold no role: their kind decides). The
/// broker knows the same roles: the portal tells it which one an operator acts in.
pub use suanli_types::OperatorRole as Role;

/// Modules of the portal a permission opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Permission {
    /// See every lease and cluster of the market (not only one's own).
    ViewMarket,
    /// End anyone's lease, delist anyone's cluster.
    Intervene,
    /// Approve or reject organisation accounts.
    ReviewAccounts,
    /// Read the audit log.
    ReadAudit,
    /// Grant and withdraw operator roles.
    ManageRoles,
}

/// What each role opens. Intervening matches the broker's own rule (`may_intervene`).
pub fn permissions(role: Role) -> &'static [Permission] {
    use Permission::*;
    match role {
        Role::Dispatcher => &[ViewMarket, Intervene],
        Role::Monitor => &[ViewMarket],
        Role::Operator => &[ViewMarket, Intervene, ReviewAccounts],
        Role::Auditor => &[ReadAudit],
        Role::SystemAdministrator => &[ManageRoles],
    }
}

/// The first mutually exclusive pair within `roles`, if any (`OperatorRole::EXCLUSIVE`, the
/// rule the broker enforces too).
pub fn role_conflict(roles: &[Role]) -> Option<(Role, Role)> {
    Role::conflict(roles)
}

pub fn has_permission(roles: &[Role], permission: Permission) -> bool {
    roles.iter().any(|r| permissions(*r).contains(&permission))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_pairs() {
        assert_eq!(role_conflict(&[Role::Dispatcher, Role::Monitor]), None);
        assert_eq!(role_conflict(&[Role::Operator, Role::SystemAdministrator]), Some((Role::SystemAdministrator, Role::Operator)));
        assert!(role_conflict(&[Role::Auditor, Role::Monitor]).is_some());
        // No single role both intervenes and manages roles, and auditors only read the log.
        for r in Role::ALL {
            let p = permissions(r);
            assert!(!(p.contains(&Permission::Intervene) && p.contains(&Permission::ManageRoles)), "{r:?}");
            assert_eq!(p.contains(&Permission::Intervene), r.may_intervene(), "portal and broker agree on {r:?}");
        }
        assert_eq!(permissions(Role::Auditor), &[Permission::ReadAudit]);
    }

    #[test]
    fn text_round_trip() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert!(UserType::Individual.allowed_for(UserKind::Supplier));
        assert!(!UserType::Individual.allowed_for(UserKind::Researcher));
        assert!(!UserType::Staff.allowed_for(UserKind::Researcher));
    }
}
