//! A lease storm against a broker cluster, and the checks of what it leaves: researchers'
//! clients requesting and ending leases through any node while the test kills, partitions or
//! upgrades nodes, each retrying with the same request ID while the cluster is unavailable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use suanli_proto::decode_status;
use suanli_proto::v1::{self, AccountKind};
use suanli_types::{ClusterClass, ErrorCode};

use crate::cluster::{check_no_card_held_twice, leases_as_applied, BrokerCluster, PLATFORM_TOKEN};
use crate::fixtures::{self, register};

/// A supplier's Class B cluster and a researcher who leases from it.
pub struct Market {
    pub researcher_token: String,
    pub cluster: v1::Cluster,
}

/// A supplier with one Class B cluster of `cards` cards, and a researcher; made through node
/// `via`.
pub async fn market(cluster: &BrokerCluster, via: u64, cards: u32) -> Market {
    let mut platform = cluster.client(via, PLATFORM_TOKEN).await.expect("client");
    let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
    let (_, researcher_token) = register(&mut platform, AccountKind::Researcher, "researcher").await.expect("researcher");
    let mut supplier = cluster.client(via, &supplier_token).await.expect("client");
    let cluster = fixtures::publish(&mut supplier, ClusterClass::B, 1, cards, "b").await.expect("publish");
    Market { researcher_token, cluster }
}

/// One card of `cluster` for one hour.
pub fn lease_request(cluster: u64, request_id: String) -> v1::RequestLeaseRequest {
    v1::RequestLeaseRequest { request_id, cluster_id: cluster, node_ids: vec![], cards: 1, billing_mode: v1::BillingMode::Hourly.into(), periods: 1 }
}

/// What a client learned of one lease request.
#[derive(Debug, Clone)]
pub enum Outcome {
    Acked(Box<v1::Lease>),
    Refused(ErrorCode),
    /// It gave up retrying: the request may or may not have been applied.
    Unknown,
}

/// One request of the storm: its ID, what came of it, how many calls it took (every call but
/// the last failed as unavailable) and how long from the first call to the answer.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: String,
    pub outcome: Outcome,
    pub calls: usize,
    pub took: Duration,
}

/// How long a client waits after a failed call before the next (to another node).
const RETRY_AFTER: Duration = Duration::from_millis(20);

/// Clients requesting and ending leases until stopped.
pub struct Storm {
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<Request>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Storm {
    /// `workers` clients leasing one card at a time from the market's cluster, through every
    /// live node of `cluster` in turn.
    pub fn start(cluster: &BrokerCluster, market: &Market, workers: usize) -> Storm {
        let addresses: Arc<Vec<String>> = Arc::new(cluster.ids().iter().filter_map(|id| cluster.address(*id).ok()).map(str::to_owned).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..workers)
            .map(|w| {
                let client = Client { addresses: addresses.clone(), token: market.researcher_token.clone(), cluster_id: market.cluster.cluster_id, worker: w };
                tokio::spawn(client.run(stop.clone(), history.clone()))
            })
            .collect();
        Storm { stop, history, workers }
    }

    /// How many requests were acknowledged so far.
    pub fn acked_so_far(&self) -> usize {
        self.history.lock().expect("history").iter().filter(|r| matches!(r.outcome, Outcome::Acked(_))).count()
    }

    /// The leases acknowledged so far.
    pub fn acked_leases(&self) -> Vec<v1::Lease> {
        let history = self.history.lock().expect("history");
        history.iter().filter_map(|r| if let Outcome::Acked(l) = &r.outcome { Some(l.as_ref().clone()) } else { None }).collect()
    }

    /// Waits until `more` requests beyond `since` were acknowledged: the cluster serves writes.
    pub async fn progresses(&self, since: usize, more: usize, timeout: Duration) -> anyhow::Result<usize> {
        crate::eventually(timeout, Duration::from_millis(50), || async {
            let now = self.acked_so_far();
            (now >= since + more).then_some(now)
        })
        .await
    }

    /// Stops the clients (each finishes the request it is in) and returns every request.
    pub async fn stop(self) -> History {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.expect("storm client");
        }
        let requests = self.history.lock().expect("history").clone();
        History { requests }
    }
}

struct Client {
    addresses: Arc<Vec<String>>,
    token: String,
    cluster_id: u64,
    worker: usize,
}

impl Client {
    /// Requests a lease, retrying with the same request ID while the cluster is unavailable;
    /// ends it again when granted, so the cards churn.
    async fn run(self, stop: Arc<AtomicBool>, history: Arc<Mutex<Vec<Request>>>) {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let id = format!("w{}-{n}", self.worker);
            let request = self.request(id).await;
            if let Outcome::Acked(lease) = &request.outcome {
                self.end(&request.id, lease.lease_id).await;
            }
            history.lock().expect("history").push(request);
        }
    }

    async fn request(&self, id: String) -> Request {
        let started = Instant::now();
        let cluster_id = self.cluster_id;
        let (answer, calls) = self
            .until_answered(|mut client| {
                let call = lease_request(cluster_id, id.clone());
                async move { client.request_lease(within_call_timeout(call)).await.map(|r| r.into_inner()) }
            })
            .await;
        let outcome = match answer {
            Some(Ok(lease)) => Outcome::Acked(Box::new(lease)),
            Some(Err(code)) => Outcome::Refused(code),
            None => Outcome::Unknown,
        };
        Request { id, outcome, calls, took: started.elapsed() }
    }

    /// Frees the card again, retrying with the same request ID while the cluster is
    /// unavailable (a card left leased would shrink the market under the storm); the checks do
    /// not rely on it.
    async fn end(&self, request_id: &str, lease_id: u64) {
        let call = v1::EndLeaseRequest { request_id: format!("end-{request_id}"), lease_id, reason: v1::EndReason::ByResearcher.into() };
        self.until_answered(|mut client| {
            let call = call.clone();
            async move { client.end_lease(within_call_timeout(call)).await.map(drop) }
        })
        .await;
    }

    /// Calls `op` through the nodes in turn until it is answered or refused, retrying (after
    /// [`RETRY_AFTER`]) while the cluster is unavailable, for up to 10 s. Returns the answer
    /// (`None`: none in time) and how many calls it took.
    async fn until_answered<T, F, Fut>(&self, mut op: F) -> (Option<Result<T, ErrorCode>>, usize)
    where
        F: FnMut(suanli_proto::client::Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut calls = 0usize;
        while Instant::now() < deadline {
            calls += 1;
            let address = &self.addresses[(self.worker + calls) % self.addresses.len()];
            if let Ok(client) = suanli_proto::client::connect(&format!("http://{address}"), Some(&self.token)).await {
                match op(client).await {
                    Ok(answer) => return (Some(Ok(answer)), calls),
                    Err(status) => {
                        let code = decode_status(&status).code;
                        if !matches!(code, ErrorCode::Unavailable | ErrorCode::Internal) {
                            return (Some(Err(code)), calls);
                        }
                    }
                }
            }
            tokio::time::sleep(RETRY_AFTER).await;
        }
        (None, calls)
    }
}

/// A call that gives up after 2 s (then retried through another node).
fn within_call_timeout<T>(message: T) -> tonic::Request<T> {
    let mut call = tonic::Request::new(message);
    call.set_timeout(Duration::from_secs(2));
    call
}

/// Every request of a storm.
pub struct History {
    pub requests: Vec<Request>,
}

impl History {
    pub fn acked(&self) -> Vec<&v1::Lease> {
        self.requests.iter().filter_map(|r| if let Outcome::Acked(l) = &r.outcome { Some(l.as_ref()) } else { None }).collect()
    }

    pub fn unknown(&self) -> usize {
        self.requests.iter().filter(|r| matches!(r.outcome, Outcome::Unknown)).count()
    }

    pub fn refused(&self) -> BTreeMap<ErrorCode, usize> {
        let mut refused = BTreeMap::new();
        for r in &self.requests {
            if let Outcome::Refused(code) = r.outcome {
                *refused.entry(code).or_default() += 1;
            }
        }
        refused
    }

    /// Calls that failed as unavailable before their request got its answer.
    pub fn failed_calls(&self) -> usize {
        self.requests.iter().map(|r| r.calls.saturating_sub(1)).sum()
    }

    /// The `q`-quantile (0 to 1) of the time acknowledged requests took, retries included.
    pub fn latency_quantile(&self, q: f64) -> Duration {
        let mut took: Vec<Duration> = self.requests.iter().filter(|r| matches!(r.outcome, Outcome::Acked(_))).map(|r| r.took).collect();
        took.sort();
        if took.is_empty() {
            return Duration::ZERO;
        }
        took[((took.len() - 1) as f64 * q).round() as usize]
    }

    pub fn summary(&self) -> String {
        format!(
            "{} requests, {} acknowledged, {} unknown, refused {:?}, {} failed calls, p50 {:?}, p99 {:?}, max {:?}",
            self.requests.len(),
            self.acked().len(),
            self.unknown(),
            self.refused(),
            self.failed_calls(),
            self.latency_quantile(0.5),
            self.latency_quantile(0.99),
            self.latency_quantile(1.0),
        )
    }

    /// Panics unless the storm's history holds: every acknowledged lease is on every live node
    /// with the cards it was granted; no two requests got one lease; no lease came from a
    /// request that was told a definitive no; and the cluster's whole event stream never has a
    /// card held by two leases at once.
    pub async fn check(&self, cluster: &BrokerCluster) {
        let acked = self.acked();
        let mut leases_made = 0;
        for id in cluster.live() {
            let platform = cluster.client(id, PLATFORM_TOKEN).await.expect("client");
            let all: BTreeMap<u64, v1::Lease> = leases_as_applied(&platform, false).await.expect("list").into_iter().map(|l| (l.lease_id, l)).collect();
            for lease in &acked {
                let stored = all.get(&lease.lease_id).unwrap_or_else(|| panic!("node {id} lost acknowledged {}", lease.lease_id));
                assert_eq!(stored.card_ids, lease.card_ids);
            }
            leases_made = all.len();
        }
        let distinct: BTreeSet<u64> = acked.iter().map(|l| l.lease_id).collect();
        assert_eq!(distinct.len(), acked.len(), "two requests acknowledged with one lease");
        // Every lease the market holds came from an acknowledged request or one whose outcome
        // the client never learned.
        assert!(
            leases_made <= acked.len() + self.unknown(),
            "{leases_made} leases from {} acknowledged and {} unknown requests: a refused request was committed",
            acked.len(),
            self.unknown()
        );
        let mut platform = cluster.client(cluster.live()[0], PLATFORM_TOKEN).await.expect("client");
        let granted = check_no_card_held_twice(&mut platform, "sentinel").await;
        for lease in &acked {
            assert!(granted.contains(&lease.lease_id), "acknowledged {} missing from the event stream", lease.lease_id);
        }
    }
}
