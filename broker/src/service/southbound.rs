//! The SPEC §4 interfaces: Icpcss (`SupplierService`), Itm (`TaskService`) and Irmds
//! (`MonitoringService`, implemented by the agent issue).

use suanli_proto::to_status;
use suanli_proto::v1::{
    self, monitoring_service_server::MonitoringService, supplier_service_server::SupplierService,
    task_service_server::TaskService,
};
use suanli_types::error::EntityKind;
use suanli_types::{Caller, DomainError, LeaseId};
use tonic::{Request, Response, Status, Streaming};

use super::broker_api::{lease_reply, set_card_status};
use super::{may_see_lease, wire, Consistency, Shared};
use crate::state::{Command, Lease, State};

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
    async fn report_card_status(
        &self,
        request: Request<v1::ReportCardStatusRequest>,
    ) -> Result<Response<v1::Card>, Status> {
        self.shared
            .observe("ReportCardStatus", async {
                let caller = self.shared.caller(&request)?;
                let req = request.into_inner();
                set_card_status(&self.shared, caller, &req.request_id, req.card_id, req.status).await
            })
            .await
    }

    async fn confirm_provisioned(
        &self,
        request: Request<v1::ConfirmProvisionedRequest>,
    ) -> Result<Response<v1::Lease>, Status> {
        self.shared
            .observe("ConfirmProvisioned", async {
                let caller = self.shared.caller(&request)?;
                let req = request.into_inner();
                let lease = LeaseId(req.lease_id);
                lease_reply(self.shared.propose(caller, &req.request_id, Command::ActivateLease { lease }).await?)
            })
            .await
    }

    async fn list_assigned_leases(
        &self,
        request: Request<v1::ListAssignedLeasesRequest>,
    ) -> Result<Response<v1::ListAssignedLeasesResponse>, Status> {
        self.shared
            .observe("ListAssignedLeases", async {
                let consistency = Consistency::of(&request);
                let Caller::Account(supplier) = self.shared.caller(&request)? else {
                    return Err(to_status(&DomainError::PermissionDenied("supplier accounts only".into())));
                };
                let leases = self
                    .shared
                    .read(consistency, |s| {
                        s.leases_of(supplier)
                            .filter(|l| l.supplier == supplier && l.state.is_live())
                            .map(wire::lease)
                            .collect()
                    })
                    .await?;
                Ok(Response::new(v1::ListAssignedLeasesResponse { leases }))
            })
            .await
    }
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
                let caller = self.shared.caller(&request)?;
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
                let caller = self.shared.caller(&request)?;
                let live_only = request.get_ref().live_only;
                let tasks = self
                    .shared
                    .read(consistency, |s| {
                        s.leases()
                            .filter(|l| may_see_lease(&caller, l) && (!live_only || l.state.is_live()))
                            .map(|l| task_of(s, l))
                            .collect()
                    })
                    .await?;
                Ok(Response::new(v1::ListTasksResponse { tasks }))
            })
            .await
    }
}

/// Irmds: the contract is fixed; telemetry arrives with the agent issue.
pub struct Irmds;

#[tonic::async_trait]
impl MonitoringService for Irmds {
    async fn push_samples(
        &self,
        _request: Request<Streaming<v1::NodeSample>>,
    ) -> Result<Response<v1::PushSamplesResponse>, Status> {
        Err(Status::unimplemented("telemetry ingestion arrives with the supplier agent"))
    }

    async fn query_cluster(
        &self,
        _request: Request<v1::QueryClusterRequest>,
    ) -> Result<Response<v1::QueryClusterResponse>, Status> {
        Err(Status::unimplemented("telemetry queries arrive with the supplier agent"))
    }
}
