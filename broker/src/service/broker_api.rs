//! `suanli.v1.Broker`: the public API.

use std::pin::Pin;

use futures::Stream;
use suanli_proto::convert::{
    account_kind_from_wire, billing_mode_from_wire, card_status_from_wire, catalogue_filter_from_wire, cluster_class_from_wire, end_reason_from_wire,
    inventory_from_wire, listing_from_wire,
};
use suanli_proto::to_status;
use suanli_proto::v1::{self, broker_server::Broker};
use suanli_types::error::EntityKind;
use suanli_types::{AccountId, Caller, CardId, ClusterId, DomainError, LeaseId, LeaseUnit, NodeId, PageRequest, SecretHash, SshPublicKey};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::jobs::billing;
use super::paging::Page;
use super::{auth_code_domain, invalid, may_see_lease, now, random_secret, wire, Consistency, Shared, TOKEN_DOMAIN};
use crate::state::{Command, Response as Applied};

pub struct BrokerApi {
    shared: Shared,
}

impl BrokerApi {
    pub fn new(shared: Shared) -> Self {
        BrokerApi { shared }
    }
}

fn required_id(field: &str, id: u64) -> Result<u64, Status> {
    if id == 0 {
        Err(invalid(field, "required"))
    } else {
        Ok(id)
    }
}

pub(crate) fn unexpected(what: &Applied) -> Status {
    Status::internal(format!("unexpected state machine response {what:?}"))
}

pub(crate) fn lease_reply(applied: Applied) -> Result<Response<v1::Lease>, Status> {
    match applied {
        Applied::Lease(l) => Ok(Response::new(wire::lease(&l))),
        other => Err(unexpected(&other)),
    }
}

impl BrokerApi {
    fn cluster_reply(&self, applied: Applied) -> Result<Response<v1::Cluster>, Status> {
        match applied {
            Applied::Cluster(c) => {
                let wire = self.shared.sm.read(|s| {
                    let summary = s.summary(&c);
                    wire::cluster(&summary)
                });
                Ok(Response::new(wire))
            }
            other => Err(unexpected(&other)),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Broker for BrokerApi {
    async fn register_account(&self, request: Request<v1::RegisterAccountRequest>) -> Result<Response<v1::RegisterAccountResponse>, Status> {
        self.shared
            .observe("RegisterAccount", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let kind = account_kind_from_wire(req.kind).ok_or_else(|| invalid("kind", "required"))?;
                let token = if req.token.is_empty() {
                    format!("sl_{}", random_secret(40))
                } else if (32..=256).contains(&req.token.len()) && req.token.bytes().all(|b| b.is_ascii_graphic()) {
                    req.token
                } else {
                    return Err(invalid("token", "32 to 256 printable ASCII characters, or empty"));
                };
                let token_hash = SecretHash::of(TOKEN_DOMAIN, &token);
                let applied = self.shared.propose(caller, &req.request_id, Command::RegisterAccount { kind, token_hash }).await?;
                let Applied::Account(id) = applied else { return Err(unexpected(&applied)) };
                // A retried request returns the first answer; its token was shown then.
                let ours = self.shared.sm.read(|s| s.account(id).is_some_and(|a| a.token_hash.matches(&token_hash)));
                Ok(Response::new(v1::RegisterAccountResponse { account_id: id.0, token: if ours { token } else { String::new() } }))
            })
            .await
    }

    async fn add_ssh_key(&self, request: Request<v1::AddSshKeyRequest>) -> Result<Response<v1::AddSshKeyResponse>, Status> {
        self.shared
            .observe("AddSshKey", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let account = AccountId(required_id("account_id", req.account_id)?);
                let key = SshPublicKey::parse(&req.public_key).map_err(|e| to_status(&e))?;
                self.shared.propose(caller, &req.request_id, Command::AddSshKey { account, key }).await?;
                Ok(Response::new(v1::AddSshKeyResponse {}))
            })
            .await
    }

    async fn remove_ssh_key(&self, request: Request<v1::RemoveSshKeyRequest>) -> Result<Response<v1::RemoveSshKeyResponse>, Status> {
        self.shared
            .observe("RemoveSshKey", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let account = AccountId(required_id("account_id", req.account_id)?);
                let key = SshPublicKey::parse(&req.public_key).map_err(|e| to_status(&e))?;
                self.shared.propose(caller, &req.request_id, Command::RemoveSshKey { account, key }).await?;
                Ok(Response::new(v1::RemoveSshKeyResponse {}))
            })
            .await
    }

    async fn rotate_account_token(&self, request: Request<v1::RotateAccountTokenRequest>) -> Result<Response<v1::RotateAccountTokenResponse>, Status> {
        self.shared
            .observe("RotateAccountToken", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let account = AccountId(required_id("account_id", req.account_id)?);
                let token = format!("sl_{}", random_secret(40));
                let token_hash = SecretHash::of(TOKEN_DOMAIN, &token);
                self.shared.propose(caller, &req.request_id, Command::RotateAccountToken { account, token_hash }).await?;
                // A retried request returns the first answer; its token was shown then.
                let ours = self.shared.sm.read(|s| s.account(account).is_some_and(|a| a.token_hash.matches(&token_hash)));
                Ok(Response::new(v1::RotateAccountTokenResponse { token: if ours { token } else { String::new() } }))
            })
            .await
    }

    async fn enroll_node(&self, request: Request<v1::EnrollNodeRequest>) -> Result<Response<v1::Node>, Status> {
        self.shared
            .observe("EnrollNode", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let inventory = inventory_from_wire(req.inventory).map_err(|e| to_status(&e))?;
                match self.shared.propose(caller, &req.request_id, Command::EnrollNode { inventory }).await? {
                    Applied::Node(n) => Ok(Response::new(wire::node(&n))),
                    other => Err(unexpected(&other)),
                }
            })
            .await
    }

    async fn publish_cluster(&self, request: Request<v1::PublishClusterRequest>) -> Result<Response<v1::Cluster>, Status> {
        self.shared
            .observe("PublishCluster", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let class = cluster_class_from_wire(req.class);
                let listing = listing_from_wire(req.listing);
                let (class, listing) = match (class, listing) {
                    (Some(c), Ok(l)) => (c, l),
                    (None, listing) => {
                        let mut fields = vec![suanli_types::FieldError::new("class", "required: A or B")];
                        if let Err(e) = listing {
                            fields.extend(e.field_errors().iter().cloned());
                        }
                        return Err(to_status(&DomainError::Invalid(fields)));
                    }
                    (_, Err(e)) => return Err(to_status(&e)),
                };
                let nodes = req.node_ids.into_iter().map(NodeId).collect();
                let applied = self.shared.propose(caller, &req.request_id, Command::PublishCluster { class, nodes, listing }).await?;
                self.cluster_reply(applied)
            })
            .await
    }

    async fn modify_cluster(&self, request: Request<v1::ModifyClusterRequest>) -> Result<Response<v1::Cluster>, Status> {
        self.shared
            .observe("ModifyCluster", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let cluster = ClusterId(required_id("cluster_id", req.cluster_id)?);
                let listing = listing_from_wire(req.listing).map_err(|e| to_status(&e))?;
                let applied = self.shared.propose(caller, &req.request_id, Command::ModifyCluster { cluster, listing }).await?;
                self.cluster_reply(applied)
            })
            .await
    }

    async fn delist_cluster(&self, request: Request<v1::DelistClusterRequest>) -> Result<Response<v1::Cluster>, Status> {
        self.shared
            .observe("DelistCluster", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let cluster = ClusterId(required_id("cluster_id", req.cluster_id)?);
                let applied = self.shared.propose(caller, &req.request_id, Command::DelistCluster { cluster }).await?;
                self.cluster_reply(applied)
            })
            .await
    }

    async fn set_card_status(&self, request: Request<v1::SetCardStatusRequest>) -> Result<Response<v1::Card>, Status> {
        self.shared
            .observe("SetCardStatus", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                set_card_status(&self.shared, caller, &req.request_id, req.card_id, req.status).await
            })
            .await
    }

    async fn approve_lease(&self, request: Request<v1::ApproveLeaseRequest>) -> Result<Response<v1::ApproveLeaseResponse>, Status> {
        self.shared
            .observe("ApproveLease", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let lease = LeaseId(required_id("lease_id", req.lease_id)?);
                let reserved_until = self
                    .shared
                    .sm
                    .read(|s| s.lease(lease).map(|l| l.reserved_until))
                    .ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Lease, lease)))?;
                let code_expires_at = match req.code_valid_seconds {
                    0 => reserved_until,
                    s => now().plus_seconds(s as i64).min(reserved_until),
                };
                let code = random_secret(16);
                let code_hash = SecretHash::of(&auth_code_domain(lease), &code);
                let applied = self.shared.propose(caller, &req.request_id, Command::ApproveLease { lease, code_hash, code_expires_at }).await?;
                let Applied::Lease(l) = applied else { return Err(unexpected(&applied)) };
                let ours = l.auth_code.as_ref().is_some_and(|a| a.hash.matches(&code_hash));
                Ok(Response::new(v1::ApproveLeaseResponse { lease: Some(wire::lease(&l)), authorization_code: if ours { code } else { String::new() } }))
            })
            .await
    }

    async fn activate_lease(&self, request: Request<v1::LeaseRef>) -> Result<Response<v1::Lease>, Status> {
        self.shared
            .observe("ActivateLease", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let lease = LeaseId(required_id("lease_id", req.lease_id)?);
                lease_reply(self.shared.propose(caller, &req.request_id, Command::ActivateLease { lease }).await?)
            })
            .await
    }

    async fn request_lease(&self, request: Request<v1::RequestLeaseRequest>) -> Result<Response<v1::Lease>, Status> {
        self.shared
            .observe("RequestLease", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let cluster = ClusterId(required_id("cluster_id", req.cluster_id)?);
                let billing_mode = billing_mode_from_wire(req.billing_mode).ok_or_else(|| invalid("billing_mode", "required"))?;
                let unit = match (req.node_ids.is_empty(), req.cards) {
                    (false, 0) => LeaseUnit::Nodes(req.node_ids.into_iter().map(NodeId).collect()),
                    (true, n) if n > 0 => LeaseUnit::Cards(n),
                    _ => return Err(invalid("unit", "give node_ids (Class A) or cards (Class B), not both")),
                };
                let command = Command::RequestLease { cluster, unit, billing_mode, periods: req.periods };
                lease_reply(self.shared.propose(caller, &req.request_id, command).await?)
            })
            .await
    }

    async fn verify_auth_code(&self, request: Request<v1::VerifyAuthCodeRequest>) -> Result<Response<v1::Lease>, Status> {
        self.shared
            .observe("VerifyAuthCode", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let lease = LeaseId(required_id("lease_id", req.lease_id)?);
                let code = req.authorization_code.trim().to_ascii_uppercase();
                if code.is_empty() || code.len() > 64 {
                    return Err(invalid("authorization_code", "required, at most 64 characters"));
                }
                let candidate_hash = SecretHash::of(&auth_code_domain(lease), &code);
                let command = Command::VerifyAuthCode { lease, candidate_hash };
                lease_reply(self.shared.propose(caller, &req.request_id, command).await?)
            })
            .await
    }

    async fn extend_lease(&self, request: Request<v1::ExtendLeaseRequest>) -> Result<Response<v1::Lease>, Status> {
        self.shared
            .observe("ExtendLease", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let lease = LeaseId(required_id("lease_id", req.lease_id)?);
                let command = Command::ExtendLease { lease, periods: req.periods };
                lease_reply(self.shared.propose(caller, &req.request_id, command).await?)
            })
            .await
    }

    async fn end_lease(&self, request: Request<v1::EndLeaseRequest>) -> Result<Response<v1::Lease>, Status> {
        self.shared
            .observe("EndLease", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let lease = LeaseId(required_id("lease_id", req.lease_id)?);
                let reason = end_reason_from_wire(req.reason).ok_or_else(|| invalid("reason", "required"))?;
                lease_reply(self.shared.propose(caller, &req.request_id, Command::EndLease { lease, reason }).await?)
            })
            .await
    }

    async fn list_catalogue(&self, request: Request<v1::ListCatalogueRequest>) -> Result<Response<v1::ListCatalogueResponse>, Status> {
        self.shared
            .observe("ListCatalogue", async {
                let consistency = Consistency::of(&request);
                self.shared.caller(&request).await?;
                let req = request.into_inner();
                let filter = catalogue_filter_from_wire(&req).map_err(|e| to_status(&e))?;
                let page = PageRequest { after: (req.page_after_cluster_id > 0).then_some(ClusterId(req.page_after_cluster_id)), limit: req.page_size };
                let (clusters, next) = self
                    .shared
                    .read(consistency, |s| s.catalogue(&filter, &page).map(|(page, next)| (page.iter().map(wire::cluster).collect::<Vec<_>>(), next)))
                    .await?
                    .map_err(|e| to_status(&e))?;
                Ok(Response::new(v1::ListCatalogueResponse { clusters, next_page_after_cluster_id: next.map_or(0, |c| c.0) }))
            })
            .await
    }

    async fn get_cluster(&self, request: Request<v1::GetClusterRequest>) -> Result<Response<v1::Cluster>, Status> {
        self.shared
            .observe("GetCluster", async {
                let consistency = Consistency::of(&request);
                self.shared.caller(&request).await?;
                let id = ClusterId(required_id("cluster_id", request.get_ref().cluster_id)?);
                self.shared
                    .read(consistency, |s| s.cluster(id).map(|c| wire::cluster(&s.summary(c))))
                    .await?
                    .map(Response::new)
                    .ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Cluster, id)))
            })
            .await
    }

    async fn list_cards(&self, request: Request<v1::ListCardsRequest>) -> Result<Response<v1::ListCardsResponse>, Status> {
        self.shared
            .observe("ListCards", async {
                let consistency = Consistency::of(&request);
                self.shared.caller(&request).await?;
                let id = ClusterId(required_id("cluster_id", request.get_ref().cluster_id)?);
                let cards = self
                    .shared
                    .read(consistency, |s| s.cluster(id).map(|_| s.cards_of_cluster(id).into_iter().map(wire::card).collect()))
                    .await?
                    .ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Cluster, id)))?;
                Ok(Response::new(v1::ListCardsResponse { cards }))
            })
            .await
    }

    async fn get_lease(&self, request: Request<v1::GetLeaseRequest>) -> Result<Response<v1::Lease>, Status> {
        self.shared
            .observe("GetLease", async {
                let consistency = Consistency::of(&request);
                let caller = self.shared.caller(&request).await?;
                let id = LeaseId(required_id("lease_id", request.get_ref().lease_id)?);
                // Also what ended long ago: the archive keeps it.
                self.shared
                    .read_with_archive(consistency, |sm| Ok(super::archived::lease(sm, id)?.filter(|l| may_see_lease(&caller, l)).map(|l| wire::lease(&l))))
                    .await?
                    .map(Response::new)
                    .ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Lease, id)))
            })
            .await
    }

    async fn get_lease_access(&self, request: Request<v1::GetLeaseRequest>) -> Result<Response<v1::LeaseAccess>, Status> {
        self.shared
            .observe("GetLeaseAccess", async {
                let consistency = Consistency::of(&request);
                let caller = self.shared.caller(&request).await?;
                let id = LeaseId(required_id("lease_id", request.get_ref().lease_id)?);
                self.shared
                    .read(consistency, |s| s.lease(id).filter(|l| may_see_lease(&caller, l)).map(|l| wire::lease_access(s, l)))
                    .await?
                    .map(Response::new)
                    .ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Lease, id)))
            })
            .await
    }

    async fn issue_ssh_certificate(&self, request: Request<v1::IssueSshCertificateRequest>) -> Result<Response<v1::SshCertificate>, Status> {
        self.shared
            .observe("IssueSshCertificate", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let lease = LeaseId(required_id("lease_id", req.lease_id)?);
                suanli_types::SshPublicKey::parse(&req.public_key).map_err(|e| to_status(&e))?;
                let valid = match req.valid_seconds {
                    0 => 8 * 3600,
                    s if u64::from(s) > suanli_pki::ssh::MAX_CERTIFICATE_SECONDS => {
                        return Err(invalid("valid_seconds", "at most 86400 (24 hours)"));
                    }
                    s => u64::from(s),
                };
                let ca = self
                    .shared
                    .ssh_ca
                    .clone()
                    .ok_or_else(|| suanli_proto::error::status(suanli_types::ErrorCode::Internal, "this broker node holds no SSH user CA", &[]))?;
                // Who may log in where, from a linearizable view of the lease.
                let (principals, paid_until) = self
                    .shared
                    .read(Consistency::Linearizable, |s| {
                        let l = s.lease(lease).filter(|l| matches!(caller, Caller::Account(id) if id == l.researcher))?;
                        let mut logins: Vec<String> = wire::lease_access(s, l).nodes.into_iter().map(|n| n.login).collect();
                        logins.sort();
                        logins.dedup();
                        Some((l.state, logins, l.paid_until))
                    })
                    .await?
                    .map(|(state, logins, paid)| (state == suanli_types::LeaseState::Active).then_some((logins, paid)))
                    .ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Lease, lease)))?
                    .ok_or_else(|| invalid("lease_id", "certificates are for active leases"))?;
                if principals.is_empty() {
                    return Err(invalid("lease_id", "no node of this lease runs an SSH gateway yet"));
                }
                let now_s = (now().millis() / 1000) as u64;
                let valid_until = paid_until.map_or(now_s, |t| (t.millis() / 1000) as u64).min(now_s + valid);
                let serial = rand::random::<u64>() >> 1;
                let certificate = ca
                    .sign_user(&suanli_pki::ssh::UserCertificate {
                        public_key: &req.public_key,
                        principals: &principals,
                        // The key ID names the lease (`lease-<id>`); gateways admit a certificate
                        // only to the lease it names, not to whatever lease has the login.
                        key_id: &lease.to_string(),
                        serial,
                        now: now_s,
                        valid_until,
                    })
                    .map_err(|e| invalid("public_key", &e.to_string()))?;
                tracing::info!(%lease, serial, "ssh certificate issued");
                Ok(Response::new(v1::SshCertificate { certificate, serial, principals, valid_before_ms: (valid_until * 1000) as i64 }))
            })
            .await
    }

    async fn revoke_ssh_certificate(&self, request: Request<v1::RevokeSshCertificateRequest>) -> Result<Response<v1::Lease>, Status> {
        self.shared
            .observe("RevokeSshCertificate", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let lease = LeaseId(required_id("lease_id", req.lease_id)?);
                let command = Command::RevokeSshCertificate { lease, serial: req.serial };
                lease_reply(self.shared.propose(caller, &req.request_id, command).await?)
            })
            .await
    }

    async fn set_lease_password(&self, request: Request<v1::SetLeasePasswordRequest>) -> Result<Response<v1::LeasePassword>, Status> {
        self.shared
            .observe("SetLeasePassword", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let lease = LeaseId(required_id("lease_id", req.lease_id)?);
                let password = random_secret(20);
                let password_hash = SecretHash::of(&suanli_types::secret::lease_password_domain(lease), &password);
                let applied = self.shared.propose(caller, &req.request_id, Command::SetLeasePassword { lease, password_hash }).await?;
                let Applied::Lease(_) = applied else { return Err(unexpected(&applied)) };
                // A retried request returns the first answer; its password was shown then.
                let ours = self.shared.sm.read(|s| s.lease(lease).and_then(|l| l.password_hash).is_some_and(|h| h.matches(&password_hash)));
                Ok(Response::new(v1::LeasePassword { lease_id: lease.0, password: if ours { password } else { String::new() } }))
            })
            .await
    }

    async fn list_leases(&self, request: Request<v1::ListLeasesRequest>) -> Result<Response<v1::ListLeasesResponse>, Status> {
        self.shared
            .observe("ListLeases", async {
                let consistency = Consistency::of(&request);
                let caller = self.shared.caller(&request).await?;
                let req = request.get_ref();
                let (live_only, page) = (req.live_only, Page::from_wire(req.page_after_id, req.page_size)?);
                let (leases, next_page_after_id) = self
                    .shared
                    .read(consistency, |s| {
                        page.take(
                            s.leases_after(page.after)
                                .filter(|l| may_see_lease(&caller, l) && (!live_only || l.state.is_live()))
                                .map(|l| (l.id.0, wire::lease(l))),
                        )
                    })
                    .await?;
                Ok(Response::new(v1::ListLeasesResponse { leases, next_page_after_id }))
            })
            .await
    }

    async fn list_nodes(&self, request: Request<v1::ListNodesRequest>) -> Result<Response<v1::ListNodesResponse>, Status> {
        self.shared
            .observe("ListNodes", async {
                let consistency = Consistency::of(&request);
                let caller = self.shared.caller(&request).await?;
                let req = request.get_ref();
                let (unclustered_only, page) = (req.unclustered_only, Page::from_wire(req.page_after_id, req.page_size)?);
                let owner = match caller {
                    Caller::Account(id) => Some(id),
                    Caller::Platform | Caller::Operator(_) => None,
                    Caller::System | Caller::Agent(_) | Caller::Enrollee(_) => {
                        return Err(to_status(&DomainError::PermissionDenied("suppliers and the platform list nodes".into())))
                    }
                };
                let reply = self
                    .shared
                    .read(consistency, |s| {
                        let (nodes, next_page_after_id) = page.take(
                            s.nodes_after(page.after)
                                .filter(|n| owner.is_none_or(|o| n.supplier == o) && (!unclustered_only || n.cluster.is_none()))
                                .map(|n| (n.id.0, n)),
                        );
                        let cards = nodes.iter().flat_map(|n| n.cards.iter().filter_map(|c| s.card(*c))).map(wire::card).collect();
                        v1::ListNodesResponse { nodes: nodes.into_iter().map(wire::node).collect(), cards, next_page_after_id }
                    })
                    .await?;
                Ok(Response::new(reply))
            })
            .await
    }

    async fn deposit(&self, request: Request<v1::DepositRequest>) -> Result<Response<v1::LedgerTransaction>, Status> {
        billing::deposit(&self.shared, request).await
    }

    async fn grant_credit(&self, request: Request<v1::GrantCreditRequest>) -> Result<Response<v1::Balance>, Status> {
        billing::grant_credit(&self.shared, request).await
    }

    async fn get_balance(&self, request: Request<v1::GetBalanceRequest>) -> Result<Response<v1::Balance>, Status> {
        billing::get_balance(&self.shared, request).await
    }

    async fn list_transactions(&self, request: Request<v1::ListTransactionsRequest>) -> Result<Response<v1::ListTransactionsResponse>, Status> {
        billing::list_transactions(&self.shared, request).await
    }

    async fn get_statement(&self, request: Request<v1::GetStatementRequest>) -> Result<Response<v1::Statement>, Status> {
        billing::get_statement(&self.shared, request).await
    }

    async fn get_service_evaluation(&self, request: Request<v1::GetServiceEvaluationRequest>) -> Result<Response<v1::ServiceEvaluation>, Status> {
        billing::get_service_evaluation(&self.shared, request).await
    }

    async fn request_remote_lease(&self, request: Request<v1::RequestRemoteLeaseRequest>) -> Result<Response<v1::RemoteLease>, Status> {
        super::remote_leases::request(&self.shared, request).await
    }

    async fn confirm_remote_lease(&self, request: Request<v1::ConfirmRemoteLeaseRequest>) -> Result<Response<v1::RemoteLease>, Status> {
        super::remote_leases::confirm(&self.shared, request).await
    }

    async fn end_remote_lease(&self, request: Request<v1::EndRemoteLeaseRequest>) -> Result<Response<v1::RemoteLease>, Status> {
        super::remote_leases::end(&self.shared, request).await
    }

    async fn get_remote_lease(&self, request: Request<v1::GetRemoteLeaseRequest>) -> Result<Response<v1::RemoteLease>, Status> {
        super::remote_leases::get(&self.shared, request).await
    }

    async fn list_remote_leases(&self, request: Request<v1::ListRemoteLeasesRequest>) -> Result<Response<v1::ListRemoteLeasesResponse>, Status> {
        super::remote_leases::list(&self.shared, request).await
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<v1::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let caller = self.shared.caller(&request).await?;
        if !matches!(caller, Caller::Platform | Caller::Operator(_)) {
            return Err(to_status(&DomainError::PermissionDenied("the event stream is for platform services".into())));
        }
        let (after, resync) = (request.get_ref().after_index, request.get_ref().resync);
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(stream_events(self.shared.clone(), after, resync, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

pub(crate) async fn set_card_status(shared: &Shared, caller: Caller, request_id: &str, card: u64, status: i32) -> Result<Response<v1::Card>, Status> {
    let card = CardId(required_id("card_id", card)?);
    let status = card_status_from_wire(status).ok_or_else(|| invalid("status", "required"))?;
    match shared.propose(caller, request_id, Command::SetCardStatus { card, status }).await? {
        Applied::Card(c) => Ok(Response::new(wire::card(&c))),
        other => Err(unexpected(&other)),
    }
}

/// At most this many clusters, cards and leases in one part of a resync (each well under a
/// kilobyte on the wire, so a part stays far below gRPC's message limit).
const RESYNC_PART_ITEMS: usize = 1000;

/// The state as of `index` for a watcher that starts over, in parts of bounded size: clusters,
/// then cards, then live leases; every part but the last says more follow.
fn resync_parts(s: &crate::state::State, index: u64) -> Vec<v1::Resync> {
    let mut parts = vec![v1::Resync { index, ..Default::default() }];
    let mut room = RESYNC_PART_ITEMS;
    let mut next_part = |parts: &mut Vec<v1::Resync>| -> usize {
        if room == 0 {
            if let Some(last) = parts.last_mut() {
                last.more = true;
            }
            parts.push(v1::Resync { index, ..Default::default() });
            room = RESYNC_PART_ITEMS;
        }
        room -= 1;
        parts.len() - 1
    };
    for c in s.clusters() {
        let at = next_part(&mut parts);
        parts[at].clusters.push(wire::cluster(&s.summary(c)));
    }
    for card in s.cards() {
        let at = next_part(&mut parts);
        parts[at].cards.push(wire::card(card));
    }
    for lease in s.leases().filter(|l| l.state.is_live()) {
        let at = next_part(&mut parts);
        parts[at].leases.push(wire::lease(lease));
    }
    parts
}

/// Feeds one watcher: a resync if it asked for one or its position is no longer kept, the
/// backlog from the store, then live events, re-reading from the store whenever the live feed
/// overflowed.
async fn stream_events(shared: Shared, after: u64, resync: bool, tx: mpsc::Sender<Result<v1::WatchResponse, Status>>) {
    let mut live = shared.sm.subscribe();
    let mut cursor = after;
    let first_kept = shared.sm.first_event_index();
    if resync || first_kept.is_some_and(|first| cursor + 1 < first) {
        let (index, parts) = shared.sm.read_with_index(|s, index| (index, resync_parts(s, index)));
        cursor = index;
        for part in parts {
            let msg = v1::WatchResponse { kind: Some(v1::watch_response::Kind::Resync(part)) };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
    }
    loop {
        // Backlog (or catch-up after the live feed overflowed).
        loop {
            let batch = match shared.sm.events_since(cursor + 1, 1024) {
                Ok(batch) => batch,
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                    return;
                }
            };
            if batch.is_empty() {
                break;
            }
            for applied in batch {
                cursor = cursor.max(applied.index);
                if !applied.events.is_empty() && tx.send(Ok(wire::batch(&applied))).await.is_err() {
                    return;
                }
            }
        }
        loop {
            match live.recv().await {
                Ok(applied) => {
                    if applied.index <= cursor {
                        continue;
                    }
                    cursor = applied.index;
                    if !applied.events.is_empty() && tx.send(Ok(wire::batch(&applied))).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => return,
            }
        }
    }
}
