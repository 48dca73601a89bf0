//! Leases of other federation members' cards (`RequestRemoteLease` and the rest): this member's
//! record of them and the money it holds (`state::machine::remote`). The federation gateway
//! writes them with a service token carrying the `federation` power; researchers read their own.

use suanli_proto::convert::{billing_mode_from_wire, money_from_wire};
use suanli_proto::{to_status, v1};
use suanli_types::error::EntityKind;
use suanli_types::{AccountId, Caller, DomainError, RemoteLeaseId};
use tonic::{Request, Response, Status};

use super::broker_api::unexpected;
use super::paging::Page;
use super::{invalid, wire, Consistency, Shared};
use crate::state::{Command, RemoteLease, Response as Applied};

fn reply(applied: Applied) -> Result<Response<v1::RemoteLease>, Status> {
    match applied {
        Applied::RemoteLease(l) => Ok(Response::new(wire::remote_lease(&l))),
        other => Err(unexpected(&other)),
    }
}

/// A researcher sees their own; the platform and operators everyone's.
fn may_see(caller: &Caller, l: &RemoteLease) -> bool {
    match caller {
        Caller::Account(id) => *id == l.researcher,
        Caller::Platform | Caller::Operator(_) => true,
        Caller::System | Caller::Agent(_) | Caller::Enrollee(_) => false,
    }
}

fn remote_id(id: u64) -> Result<RemoteLeaseId, Status> {
    if id == 0 {
        Err(invalid("remote_lease_id", "required"))
    } else {
        Ok(RemoteLeaseId(id))
    }
}

pub async fn request(shared: &Shared, request: Request<v1::RequestRemoteLeaseRequest>) -> Result<Response<v1::RemoteLease>, Status> {
    shared
        .observe("RequestRemoteLease", async {
            let caller = shared.caller(&request).await?;
            let req = request.into_inner();
            let billing_mode = billing_mode_from_wire(req.billing_mode).ok_or_else(|| invalid("billing_mode", "required"))?;
            let price = req.price_per_card.as_ref().ok_or_else(|| invalid("price_per_card", "required"))?;
            let price_per_card = money_from_wire(price).map_err(|e| to_status(&e.into()))?;
            if req.researcher_id == 0 {
                return Err(invalid("researcher_id", "required"));
            }
            let command = Command::RequestRemoteLease {
                researcher: AccountId(req.researcher_id),
                member: req.member,
                member_name: req.member_name,
                remote_cluster: req.remote_cluster_id,
                cards: req.cards,
                billing_mode,
                periods: req.periods,
                price_per_card,
            };
            reply(shared.propose(caller, &req.request_id, command).await?)
        })
        .await
}

pub async fn confirm(shared: &Shared, request: Request<v1::ConfirmRemoteLeaseRequest>) -> Result<Response<v1::RemoteLease>, Status> {
    shared
        .observe("ConfirmRemoteLease", async {
            let caller = shared.caller(&request).await?;
            let req = request.into_inner();
            let remote = remote_id(req.remote_lease_id)?;
            if req.remote_lease_id_at_owner == 0 {
                return Err(invalid("remote_lease_id_at_owner", "required"));
            }
            reply(shared.propose(caller, &req.request_id, Command::ConfirmRemoteLease { remote, remote_lease: req.remote_lease_id_at_owner }).await?)
        })
        .await
}

pub async fn end(shared: &Shared, request: Request<v1::EndRemoteLeaseRequest>) -> Result<Response<v1::RemoteLease>, Status> {
    shared
        .observe("EndRemoteLease", async {
            let caller = shared.caller(&request).await?;
            let req = request.into_inner();
            let remote = remote_id(req.remote_lease_id)?;
            reply(shared.propose(caller, &req.request_id, Command::EndRemoteLease { remote, charged_minor: req.charged_minor }).await?)
        })
        .await
}

pub async fn get(shared: &Shared, request: Request<v1::GetRemoteLeaseRequest>) -> Result<Response<v1::RemoteLease>, Status> {
    shared
        .observe("GetRemoteLease", async {
            let consistency = Consistency::of(&request);
            let caller = shared.caller(&request).await?;
            let id = remote_id(request.get_ref().remote_lease_id)?;
            shared
                .read(consistency, |s| s.remote_lease(id).filter(|l| may_see(&caller, l)).map(wire::remote_lease))
                .await?
                .map(Response::new)
                .ok_or_else(|| to_status(&DomainError::not_found(EntityKind::RemoteLease, id)))
        })
        .await
}

pub async fn list(shared: &Shared, request: Request<v1::ListRemoteLeasesRequest>) -> Result<Response<v1::ListRemoteLeasesResponse>, Status> {
    shared
        .observe("ListRemoteLeases", async {
            let consistency = Consistency::of(&request);
            let caller = shared.caller(&request).await?;
            let req = request.get_ref();
            let page = Page::from_wire(req.page_after_id, req.page_size)?;
            let whose = match (&caller, req.researcher_id) {
                (Caller::Account(me), 0) => Some(*me),
                (Caller::Account(me), asked) if asked == me.0 => Some(*me),
                // Another researcher's list is as unknown as an empty one.
                (Caller::Account(_), _) => return Ok(Response::new(v1::ListRemoteLeasesResponse::default())),
                (_, 0) => None,
                (_, asked) => Some(AccountId(asked)),
            };
            let live_only = req.live_only;
            let (remote_leases, next_page_after_id) = shared
                .read(consistency, |s| {
                    page.take(
                        s.remote_leases_after(page.after)
                            .filter(|l| may_see(&caller, l) && whose.is_none_or(|w| l.researcher == w) && (!live_only || l.state.is_live()))
                            .map(|l| (l.id.0, wire::remote_lease(l))),
                    )
                })
                .await?;
            Ok(Response::new(v1::ListRemoteLeasesResponse { remote_leases, next_page_after_id }))
        })
        .await
}
