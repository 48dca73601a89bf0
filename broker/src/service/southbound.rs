//! The SPEC §4 interfaces: Icpcss (`SupplierService`), Itm (`TaskService`) and Irmds
//! (`MonitoringService`, in `monitoring.rs`).

use suanli_proto::convert::inventory_from_wire;
use suanli_proto::error::status;
use suanli_proto::to_status;
use suanli_proto::v1::{self, supplier_service_server::SupplierService, task_service_server::TaskService};
use suanli_types::error::EntityKind;
use suanli_types::{Caller, ClusterClass, DomainError, ErrorCode, LeaseId, NodeId, SecretHash};
use tonic::{Request, Response, Status};

use super::broker_api::{lease_reply, set_card_status, unexpected};
use super::paging::Page;
use super::{invalid, may_see_lease, now, random_secret, wire, Consistency, Shared};
use crate::network::forward::AgentKey;
use crate::state::{rules, Command, Lease, Response as Applied, State};

/// Hash domain of agent enrollment tokens.
pub const ENROLLMENT_DOMAIN: &str = "enrollment-token";
/// Hash domain of agents' key fingerprints: the agent credential the state machine keeps.
pub const AGENT_KEY_DOMAIN: &str = "agent-key";

/// The credential the state machine records for an agent key.
pub fn agent_key_hash(key: &suanli_pki::KeyFingerprint) -> SecretHash {
    SecretHash::of(AGENT_KEY_DOMAIN, &key.to_hex())
}

fn node_reply(applied: Applied) -> Result<Response<v1::Node>, Status> {
    match applied {
        Applied::Node(n) => Ok(Response::new(wire::node(&n))),
        other => Err(unexpected(&other)),
    }
}

pub struct Icpcss {
    shared: Shared,
}

impl Icpcss {
    pub fn new(shared: Shared) -> Self {
        Icpcss { shared }
    }
}

#[tonic::async_trait]
impl SupplierService for Icpcss {
    async fn create_enrollment_token(&self, request: Request<v1::CreateEnrollmentTokenRequest>) -> Result<Response<v1::CreateEnrollmentTokenResponse>, Status> {
        self.shared
            .observe("CreateEnrollmentToken", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let valid = i64::from(req.valid_seconds);
                if valid == 0 || valid > rules::ENROLLMENT_TOKEN_MAX_SECONDS {
                    let range = format!("between 1 and {} seconds", rules::ENROLLMENT_TOKEN_MAX_SECONDS);
                    return Err(invalid("valid_seconds", &range));
                }
                let token = format!("SLE-{}", random_secret(32));
                let token_hash = SecretHash::of(ENROLLMENT_DOMAIN, &token);
                let expires_at = now().plus_seconds(valid);
                self.shared.propose(caller, &req.request_id, Command::IssueEnrollmentToken { token_hash, expires_at }).await?;
                Ok(Response::new(v1::CreateEnrollmentTokenResponse { token, expires_at_ms: expires_at.millis() }))
            })
            .await
    }

    async fn enroll_agent(&self, request: Request<v1::EnrollAgentRequest>) -> Result<Response<v1::EnrollAgentResponse>, Status> {
        self.shared
            .observe("EnrollAgent", async {
                let req = request.into_inner();
                if req.enrollment_token.is_empty() || req.enrollment_token.len() > 256 {
                    return Err(invalid("enrollment_token", "required"));
                }
                let key = suanli_pki::csr_fingerprint(&req.csr_pem)
                    .map_err(|e| invalid("csr_pem", &format!("a PKCS#10 signing request (PEM) for the agent's key: {e}")))?;
                let ca = self
                    .shared
                    .agent_ca
                    .as_ref()
                    .ok_or_else(|| status(ErrorCode::Internal, "this broker node holds no agent CA ([broker] agent_ca_cert, agent_ca_key)", &[]))?;
                let inventory = inventory_from_wire(req.inventory).map_err(|e| to_status(&e))?;
                // Only a token's holder writes to the log, in a request-ID space of its own: a
                // stranger can neither append nor take IDs the broker or another holder uses.
                let token_hash = SecretHash::of(ENROLLMENT_DOMAIN, &req.enrollment_token);
                let issued = move |s: &crate::state::State| s.enrollment_token_issued(&token_hash).then_some(());
                self.shared.confirm_absent(issued, "enrollment token unknown, already used or expired").await?;
                let command = Command::EnrollAgent { token_hash, credential_hash: agent_key_hash(&key), inventory };
                let node = match self.shared.propose(Caller::Enrollee(token_hash), &req.request_id, command).await? {
                    Applied::Node(n) => n,
                    other => return Err(unexpected(&other)),
                };
                // Signed after the commit, which named the node. A retried enrollment gets a
                // new certificate for the same key: the key is what the broker recognises.
                let certificate_pem =
                    ca.sign_agent(&req.csr_pem, node.id.0).map_err(|e| status(ErrorCode::Internal, format!("signing the agent certificate: {e}"), &[]))?;
                Ok(Response::new(v1::EnrollAgentResponse { node: Some(wire::node(&node)), certificate_pem, ca_certificate_pem: ca.cert_pem().to_owned() }))
            })
            .await
    }

    async fn revoke_agent(&self, request: Request<v1::RevokeAgentRequest>) -> Result<Response<v1::Node>, Status> {
        self.shared
            .observe("RevokeAgent", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let node = NodeId(req.node_id);
                node_reply(self.shared.propose(caller, &req.request_id, Command::RevokeAgent { node }).await?)
            })
            .await
    }

    async fn get_agent_node(&self, request: Request<v1::GetAgentNodeRequest>) -> Result<Response<v1::AgentNode>, Status> {
        self.shared
            .observe("GetAgentNode", async {
                let consistency = Consistency::of(&request);
                let Caller::Agent(node) = self.shared.caller(&request).await? else {
                    return Err(to_status(&DomainError::PermissionDenied("agents only".into())));
                };
                self.shared
                    .read(consistency, |s| agent_node(s, node))
                    .await?
                    .map(|mut n| {
                        n.ssh_user_ca = self.shared.ssh_ca.as_ref().map(|ca| ca.public_line()).unwrap_or_default();
                        n.ssh_user_cas_also_trusted = self.shared.ssh_cas_also_trusted.clone();
                        n.ca_certificate_pem = self.shared.agent_ca.as_ref().map(|ca| ca.cert_pem().to_owned()).unwrap_or_default();
                        let recent = self.shared.lease_requests.lock().unwrap_or_else(|p| p.into_inner());
                        for lease in &mut n.leases {
                            lease.request_id = recent.of(lease.lease_id).unwrap_or_default().to_owned();
                        }
                        drop(recent);
                        Response::new(n)
                    })
                    .ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Node, node)))
            })
            .await
    }

    async fn renew_agent_certificate(&self, request: Request<v1::RenewAgentCertificateRequest>) -> Result<Response<v1::RenewAgentCertificateResponse>, Status> {
        self.shared
            .observe("RenewAgentCertificate", async {
                // The key the caller proved it holds at the handshake (or a peer vouched for).
                let presented = request.extensions().get::<AgentKey>().map(|AgentKey(key)| *key);
                let Caller::Agent(node) = self.shared.caller(&request).await? else {
                    return Err(to_status(&DomainError::PermissionDenied("agents only, with their certificate".into())));
                };
                let presented = presented.ok_or_else(|| to_status(&DomainError::PermissionDenied("agents only, with their certificate".into())))?;
                let req = request.into_inner();
                let requested = suanli_pki::csr_fingerprint(&req.csr_pem)
                    .map_err(|e| invalid("csr_pem", &format!("a PKCS#10 signing request (PEM) for the agent's key: {e}")))?;
                if requested != presented {
                    return Err(invalid("csr_pem", "must be for the key this call was made with: a node with a new key enrolls again"));
                }
                let ca = self
                    .shared
                    .agent_ca
                    .as_ref()
                    .ok_or_else(|| status(ErrorCode::Internal, "this broker node holds no agent CA ([broker] agent_ca_cert, agent_ca_key)", &[]))?;
                let certificate_pem =
                    ca.sign_agent(&req.csr_pem, node.0).map_err(|e| status(ErrorCode::Internal, format!("signing the agent certificate: {e}"), &[]))?;
                tracing::info!(node = node.0, "renewed an agent certificate");
                Ok(Response::new(v1::RenewAgentCertificateResponse { certificate_pem, ca_certificate_pem: ca.cert_pem().to_owned() }))
            })
            .await
    }

    async fn issue_tunnel_ticket(&self, request: Request<v1::IssueTunnelTicketRequest>) -> Result<Response<v1::IssueTunnelTicketResponse>, Status> {
        self.shared
            .observe("IssueTunnelTicket", async {
                // Its current certificate, not revoked: checked by `caller`.
                let Caller::Agent(node) = self.shared.caller(&request).await? else {
                    return Err(to_status(&DomainError::PermissionDenied("agents only, with their certificate".into())));
                };
                let key = self
                    .shared
                    .tunnel_key
                    .as_ref()
                    .ok_or_else(|| status(ErrorCode::Unavailable, "this broker holds no tunnel key ([broker] tunnel_key_file)", &[]))?;
                let expires_ms = super::now().millis() + suanli_pki::tunnel_ticket::TICKET_LIFETIME_MS;
                let ticket = key.sign(&suanli_pki::tunnel_ticket::TunnelTicket { node: node.0, expires_ms });
                Ok(Response::new(v1::IssueTunnelTicketResponse { ticket, expires_ms }))
            })
            .await
    }

    async fn report_card_status(&self, request: Request<v1::ReportCardStatusRequest>) -> Result<Response<v1::Card>, Status> {
        self.shared
            .observe("ReportCardStatus", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                set_card_status(&self.shared, caller, &req.request_id, req.card_id, req.status).await
            })
            .await
    }

    async fn confirm_provisioned(&self, request: Request<v1::ConfirmProvisionedRequest>) -> Result<Response<v1::Lease>, Status> {
        self.shared
            .observe("ConfirmProvisioned", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let lease = LeaseId(req.lease_id);
                lease_reply(self.shared.propose(caller, &req.request_id, Command::ActivateLease { lease }).await?)
            })
            .await
    }

    async fn report_node_access(&self, request: Request<v1::ReportNodeAccessRequest>) -> Result<Response<v1::Node>, Status> {
        self.shared
            .observe("ReportNodeAccess", async {
                let Caller::Agent(node) = self.shared.caller(&request).await? else {
                    return Err(to_status(&DomainError::PermissionDenied("agents only".into())));
                };
                let req = request.into_inner();
                let wire = req.access.unwrap_or_default();
                let access = suanli_types::NodeAccess::new(&wire.ssh_host, wire.ssh_port, &wire.host_key, &wire.login_prefix).map_err(|e| to_status(&e))?;
                node_reply(self.shared.propose(Caller::Agent(node), &req.request_id, Command::SetNodeAccess { node, access }).await?)
            })
            .await
    }

    async fn list_assigned_leases(&self, request: Request<v1::ListAssignedLeasesRequest>) -> Result<Response<v1::ListAssignedLeasesResponse>, Status> {
        self.shared
            .observe("ListAssignedLeases", async {
                let consistency = Consistency::of(&request);
                let Caller::Account(supplier) = self.shared.caller(&request).await? else {
                    return Err(to_status(&DomainError::PermissionDenied("supplier accounts only".into())));
                };
                let leases = self
                    .shared
                    .read(consistency, |s| s.leases_of(supplier).filter(|l| l.supplier == supplier && l.state.is_live()).map(wire::lease).collect())
                    .await?;
                Ok(Response::new(v1::ListAssignedLeasesResponse { leases }))
            })
            .await
    }
}

/// What an agent needs to know about its own node: its cards, and the live leases holding
/// them with what it takes to admit their researcher.
pub fn agent_node(s: &State, node: NodeId) -> Option<v1::AgentNode> {
    let n = s.node(node)?;
    let class = n.cluster.and_then(|c| s.cluster(c)).map(|c| c.class);
    let cards: Vec<&crate::state::Card> = n.cards.iter().filter_map(|c| s.card(*c)).collect();
    let mut leases: std::collections::BTreeMap<LeaseId, Vec<u32>> = std::collections::BTreeMap::new();
    for card in &cards {
        if let Some(lease) = card.lease {
            leases.entry(lease).or_default().push(card.spec.index);
        }
    }
    let leases = leases
        .into_iter()
        .filter_map(|(id, card_indexes)| {
            let lease = s.lease(id).filter(|l| l.state.is_live())?;
            let keys = s.account(lease.researcher).map(|a| a.ssh_keys.iter().map(|k| k.as_str().to_owned()).collect());
            Some(v1::NodeLease {
                lease_id: id.0,
                state: suanli_proto::convert::lease_state_to_wire(lease.state),
                researcher_id: lease.researcher.0,
                card_indexes,
                authorized_keys: keys.unwrap_or_default(),
                paid_until_ms: lease.paid_until.map_or(0, |t| t.millis()),
                password_hash: lease.password_hash.map(|h| h.to_hex()).unwrap_or_default(),
                revoked_certificate_serials: lease.revoked_certificates.iter().copied().collect(),
                // Filled in by the handler, from this node's memory (not the state).
                request_id: String::new(),
            })
        })
        .collect();
    Some(v1::AgentNode {
        node: Some(wire::node(n)),
        cards: cards.into_iter().map(wire::card).collect(),
        full_telemetry: class != Some(ClusterClass::A),
        leases,
        // The rest is the node's configuration, filled in by the handler.
        ssh_user_ca: String::new(),
        ca_certificate_pem: String::new(),
        ssh_user_cas_also_trusted: Vec::new(),
    })
}

pub struct Itm {
    shared: Shared,
}

impl Itm {
    pub fn new(shared: Shared) -> Self {
        Itm { shared }
    }
}

fn task_of(s: &State, l: &Lease) -> v1::Task {
    let cpc = s.cluster(l.cluster).map(|c| c.cpc.as_str().to_owned()).unwrap_or_default();
    wire::task(l, &cpc)
}

#[tonic::async_trait]
impl TaskService for Itm {
    async fn get_task(&self, request: Request<v1::GetTaskRequest>) -> Result<Response<v1::Task>, Status> {
        self.shared
            .observe("GetTask", async {
                let consistency = Consistency::of(&request);
                let caller = self.shared.caller(&request).await?;
                let id = LeaseId(request.get_ref().lease_id);
                self.shared
                    .read(consistency, |s| s.lease(id).filter(|l| may_see_lease(&caller, l)).map(|l| task_of(s, l)))
                    .await?
                    .map(Response::new)
                    .ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Lease, id)))
            })
            .await
    }

    async fn list_tasks(&self, request: Request<v1::ListTasksRequest>) -> Result<Response<v1::ListTasksResponse>, Status> {
        self.shared
            .observe("ListTasks", async {
                let consistency = Consistency::of(&request);
                let caller = self.shared.caller(&request).await?;
                let req = request.get_ref();
                let (live_only, page) = (req.live_only, Page::from_wire(req.page_after_id, req.page_size)?);
                let (tasks, next_page_after_id) = self
                    .shared
                    .read(consistency, |s| {
                        page.take(
                            s.leases_after(page.after)
                                .filter(|l| may_see_lease(&caller, l) && (!live_only || l.state.is_live()))
                                .map(|l| (l.id.0, task_of(s, l))),
                        )
                    })
                    .await?;
                Ok(Response::new(v1::ListTasksResponse { tasks, next_page_after_id }))
            })
            .await
    }
}
