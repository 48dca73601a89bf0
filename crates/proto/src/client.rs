//! Typed clients for the broker's gRPC API, with the bearer token attached to every call.

use crate::v1::broker_client::BrokerClient;
use crate::v1::cluster_admin_client::ClusterAdminClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// Metadata with which the platform token acts as an operator in one role (`dispatcher`, …):
/// the portal authenticates operators itself and tells the broker which role one acts in.
pub const ACTING_OPERATOR_HEADER: &str = "x-suanli-acting-operator";
/// With [`ACTING_OPERATOR_HEADER`]: the portal's signed word for which operator acts, and
/// with which roles (`suanli_pki::assertion`), where the broker asks for one.
pub const OPERATOR_ASSERTION_HEADER: &str = "x-suanli-operator-assertion";

#[derive(Clone)]
pub struct Bearer {
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    acting_operator: Option<MetadataValue<tonic::metadata::Ascii>>,
    operator_assertion: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.token {
            request.metadata_mut().insert("authorization", value.clone());
        }
        if let Some(role) = &self.acting_operator {
            request.metadata_mut().insert(ACTING_OPERATOR_HEADER, role.clone());
        }
        if let Some(assertion) = &self.operator_assertion {
            request.metadata_mut().insert(OPERATOR_ASSERTION_HEADER, assertion.clone());
        }
        // The request this call is made for (the portal's HTTP request), so the broker's log
        // lines for it carry the same ID.
        if let Some(id) = suanli_observability::current().and_then(|id| id.as_str().parse().ok()) {
            request.metadata_mut().insert(suanli_observability::REQUEST_ID_HEADER, id);
        }
        Ok(request)
    }
}

pub type Client = BrokerClient<InterceptedService<Channel, Bearer>>;

/// Connects to `endpoint` (`http://host:port`), authenticating as `token` (none: anonymous).
pub async fn connect(endpoint: &str, token: Option<&str>) -> Result<Client, ClientError> {
    with_token(channel(endpoint).await?, token)
}

/// As [`connect`]; an `https://` endpoint (a broker's TLS port) is checked against `ca_pem`.
pub async fn connect_checked(endpoint: &str, ca_pem: Option<&str>, token: Option<&str>) -> Result<Client, ClientError> {
    with_token(channel_checked(endpoint, ca_pem).await?, token)
}

/// A connected channel to `endpoint`; an `https://` endpoint (a broker's client port off
/// loopback, or its agent port) is checked against `ca_pem`.
pub async fn channel_checked(endpoint: &str, ca_pem: Option<&str>) -> Result<Channel, ClientError> {
    let tls = match (endpoint.starts_with("https://"), ca_pem) {
        (false, _) => None,
        (true, Some(ca)) => Some(ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca))),
        (true, None) => return Err(ClientError::Endpoint(format!("{endpoint}: give the CA certificate to check it by"))),
    };
    channel_with(endpoint, tls).await
}

/// A connected channel to `endpoint` (`http://host:port`).
pub async fn channel(endpoint: &str) -> Result<Channel, ClientError> {
    channel_with(endpoint, None).await
}

/// A connected channel to `endpoint`, over TLS with `tls` where given (`https://host:port`).
pub async fn channel_with(endpoint: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, ClientError> {
    let mut target = Endpoint::from_shared(endpoint.to_owned()).map_err(|e| ClientError::Endpoint(e.to_string()))?.tcp_nodelay(true);
    if let Some(tls) = tls {
        target = target.tls_config(tls).map_err(|e| ClientError::Endpoint(e.to_string()))?;
    }
    target.connect().await.map_err(|e| ClientError::Connect(endpoint.to_owned(), describe_chain(&e)))
}

/// An error with its sources: a TLS failure is only said two levels down.
fn describe_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The interceptor that sends `authorization: Bearer <token>`, for any generated client:
/// `XClient::with_interceptor(channel, bearer(Some(token))?)`.
pub fn bearer(token: Option<&str>) -> Result<Bearer, ClientError> {
    let value = token.map(|t| format!("Bearer {t}").parse().map_err(|_| ClientError::Token)).transpose()?;
    Ok(Bearer { token: value, acting_operator: None, operator_assertion: None })
}

/// A client with the platform token acting as an operator in `role` (e.g. `dispatcher`).
pub fn as_operator(channel: Channel, platform_token: &str, role: &str) -> Result<Client, ClientError> {
    Ok(BrokerClient::with_interceptor(channel, operator_bearer(platform_token, role, None)?).max_decoding_message_size(64 * 1024 * 1024))
}

/// The interceptor of the platform acting as an operator in `role` (with the portal's signed
/// `assertion` of who, where the broker asks for one), for any generated client.
pub fn operator_bearer(platform_token: &str, role: &str, assertion: Option<&str>) -> Result<Bearer, ClientError> {
    let mut interceptor = bearer(Some(platform_token))?;
    interceptor.acting_operator = Some(role.parse().map_err(|_| ClientError::Token)?);
    interceptor.operator_assertion = assertion.map(|a| a.parse()).transpose().map_err(|_| ClientError::Token)?;
    Ok(interceptor)
}

/// A client over an existing channel (channels are cheap to clone and multiplex calls).
pub fn with_token(channel: Channel, token: Option<&str>) -> Result<Client, ClientError> {
    Ok(BrokerClient::with_interceptor(channel, bearer(token)?).max_decoding_message_size(64 * 1024 * 1024))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint: {0}")]
    Endpoint(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("the token contains characters not allowed in a header")]
    Token,
}

pub type AdminClient = ClusterAdminClient<InterceptedService<Channel, Bearer>>;

/// A cluster-administration client (platform token).
pub async fn admin(endpoint: &str, token: &str) -> Result<AdminClient, ClientError> {
    Ok(ClusterAdminClient::with_interceptor(channel(endpoint).await?, bearer(Some(token))?))
}

/// A job-service client with the bearer token attached to every call.
pub type JobsClient = crate::v1::job_service_client::JobServiceClient<InterceptedService<Channel, Bearer>>;

/// The page size the whole-list helpers ask for: the largest the broker serves.
pub const LARGEST_PAGE: u32 = 500;

/// Every page of a paged list: `page(after)` fetches the page after a cursor and returns its
/// items and the next cursor (0: it was the last). A cursor that does not advance ends the walk
/// instead of looping forever.
pub async fn all_pages<T, Fut>(mut page: impl FnMut(u64) -> Fut) -> Result<Vec<T>, Status>
where
    Fut: std::future::Future<Output = Result<(Vec<T>, u64), Status>>,
{
    let (mut all, mut after) = (Vec::new(), 0);
    loop {
        let (items, next) = page(after).await?;
        all.extend(items);
        if next <= after {
            return Ok(all);
        }
        after = next;
    }
}

/// Every lease the caller may see (only the live ones with `live_only`), page by page.
pub async fn all_leases(client: &Client, live_only: bool) -> Result<Vec<crate::v1::Lease>, Status> {
    all_pages(|after| {
        let mut c = client.clone();
        async move {
            let r = c.list_leases(crate::v1::ListLeasesRequest { live_only, page_after_id: after, page_size: LARGEST_PAGE }).await?;
            let r = r.into_inner();
            Ok((r.leases, r.next_page_after_id))
        }
    })
    .await
}

/// Every node the caller may see, with their cards, page by page.
pub async fn all_nodes(client: &Client, unclustered_only: bool) -> Result<crate::v1::ListNodesResponse, Status> {
    let mut all = crate::v1::ListNodesResponse::default();
    let mut c = client.clone();
    loop {
        let after = all.next_page_after_id;
        let request = crate::v1::ListNodesRequest { unclustered_only, page_after_id: after, page_size: LARGEST_PAGE };
        let r = c.list_nodes(request).await?.into_inner();
        all.nodes.extend(r.nodes);
        all.cards.extend(r.cards);
        if r.next_page_after_id <= after {
            all.next_page_after_id = 0;
            return Ok(all);
        }
        all.next_page_after_id = r.next_page_after_id;
    }
}

/// Every job the caller may see (only the live ones with `live_only`), page by page.
pub async fn all_jobs(client: &JobsClient, live_only: bool) -> Result<Vec<crate::v1::Job>, Status> {
    all_pages(|after| {
        let mut c = client.clone();
        async move {
            let r = c.list_jobs(crate::v1::ListJobsRequest { live_only, page_after_id: after, page_size: LARGEST_PAGE }).await?;
            let r = r.into_inner();
            Ok((r.jobs, r.next_page_after_id))
        }
    })
    .await
}
