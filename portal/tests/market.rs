//! The market through the portal, against a real broker and real agents (simulated GPUs):
//! supplier enrollment and publishing, the catalogue, Class A and Class B leases, tenant
//! isolation, and the access rules of every route in the OpenAPI document.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use suanli_proto::v1;
use support::{fields, publish_node, Api, Backend, World};

async fn market(backend: Backend) -> anyhow::Result<()> {
    let Some(w) = World::start(backend).await? else { return Ok(()) };
    w.explain(scenario(&w).await)
}

fn ids(list: &Value, key: &str) -> Vec<u64> {
    list.as_array().into_iter().flatten().filter_map(|l| l[key].as_u64()).collect()
}

async fn scenario(w: &World) -> anyhow::Result<()> {
    let supplier = w.person("supplier", "gpu_farm").await?;
    let other_supplier = w.person("supplier", "rival_farm").await?;
    let alice = w.person("researcher", "alice").await?;
    let bob = w.person("researcher", "bob").await?;
    let (class_a, _agent_a) = publish_node(w, &supplier, "sz-a", "A", "Shenzhen", false).await?;
    let (class_b, _agent_b) = publish_node(w, &supplier, "bj-b", "B", "Beijing", false).await?;

    // The catalogue filters on listing fields and sorts; anyone may browse it.
    let anon = w.client();
    let (status, page) = anon.get("/api/v1/catalogue?class=B&region=beijing&min_idle_cards=4").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids(&page["clusters"], "cluster_id"), [class_b], "{page}");
    let (_, page) = anon.get("/api/v1/catalogue?gpu_model=a100&billing_mode=monthly&max_price_minor=400000").await?;
    assert_eq!(page["total"], 0, "price ceiling below every price: {page}");
    let (_, page) = anon.get("/api/v1/catalogue?billing_mode=hourly&sort=price&page_size=1").await?;
    assert_eq!((page["total"].as_u64(), page["clusters"].as_array().map(Vec::len)), (Some(2), Some(1)), "{page}");
    let (status, body) = anon.get("/api/v1/catalogue?sort=price").await?;
    assert_eq!((status, fields(&body)), (StatusCode::BAD_REQUEST, vec!["sort".to_owned()]), "{body}");

    // Class B: requested, provisioned by the agent, active.
    let (status, lease_b) = alice.post("/api/v1/leases", json!({"cluster_id": class_b, "cards": 2, "billing_mode": "hourly", "periods": 2})).await?;
    assert_eq!(status, StatusCode::CREATED, "{lease_b}");
    assert_eq!((lease_b["amount_minor"].as_i64(), lease_b["currency"].as_str()), (Some(2 * 2 * 1200), Some("CNY")));
    let lease_b = lease_b["lease_id"].as_u64().unwrap_or_default();
    let active = suanli_testkit::eventually(Duration::from_secs(30), Duration::from_millis(100), || async {
        let (_, l) = alice.get(&format!("/api/v1/leases/{lease_b}")).await.ok()?;
        (l["state"] == "active").then_some(l)
    })
    .await?;
    assert!(active["paid_until_ms"].as_i64() > active["activated_ms"].as_i64());
    let (_, detail) = anon.get(&format!("/api/v1/clusters/{class_b}")).await?;
    assert_eq!(detail["cluster"]["idle_cards"], 2, "the catalogue follows the broker's events: {detail}");
    let (status, body) = alice.post("/api/v1/leases", json!({"cluster_id": class_b, "cards": 3, "billing_mode": "hourly", "periods": 1})).await?;
    assert_eq!((status, Api::code(&body)), (StatusCode::CONFLICT, "INSUFFICIENT_CAPACITY"), "no card is leased twice: {body}");

    // Class A: requested → the supplier approves and receives the code → the researcher verifies.
    let (_, nodes) = anon.get(&format!("/api/v1/clusters/{class_a}")).await?;
    let node = nodes["cards"][0]["node_id"].as_u64().unwrap_or_default();
    let (status, lease_a) = alice.post("/api/v1/leases", json!({"cluster_id": class_a, "node_ids": [node], "billing_mode": "monthly", "periods": 1})).await?;
    assert_eq!(status, StatusCode::CREATED, "{lease_a}");
    let lease_a = lease_a["lease_id"].as_u64().unwrap_or_default();
    let (status, body) = other_supplier.post(&format!("/api/v1/supplier/leases/{lease_a}/approve"), json!({})).await?;
    assert!(matches!(status, StatusCode::NOT_FOUND | StatusCode::FORBIDDEN), "another supplier cannot approve: {status} {body}");
    let (status, approved) = supplier.post(&format!("/api/v1/supplier/leases/{lease_a}/approve"), json!({})).await?;
    assert_eq!(status, StatusCode::OK, "{approved}");
    let code = approved["authorization_code"].as_str().unwrap_or_default().to_owned();
    assert_eq!(code.len(), 16);
    let (_, listed) = supplier.get("/api/v1/leases").await?;
    let seen = listed.as_array().into_iter().flatten().find(|l| l["lease_id"] == lease_a).cloned().unwrap_or_default();
    assert_eq!(seen["authorization_code"].as_str(), Some(code.as_str()), "the supplier can look the code up again");

    // Tenant isolation: bob learns nothing of alice's leases, codes or credentials.
    let (_, bobs) = bob.get("/api/v1/leases").await?;
    assert_eq!(bobs.as_array().map(Vec::len), Some(0), "{bobs}");
    for path in [format!("/api/v1/leases/{lease_a}"), format!("/api/v1/leases/{lease_b}"), format!("/api/v1/leases/{lease_b}/access")] {
        let (status, body) = bob.get(&path).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    for (path, body) in [
        (format!("/api/v1/leases/{lease_a}/verify"), json!({"authorization_code": code})),
        (format!("/api/v1/leases/{lease_b}/password"), json!({})),
        (format!("/api/v1/leases/{lease_b}/end"), json!({})),
        (format!("/api/v1/leases/{lease_b}/extend"), json!({"periods": 1})),
    ] {
        let (status, reply) = bob.post(&path, body).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {reply}");
    }
    let (_, alices_view) = alice.get(&format!("/api/v1/leases/{lease_a}")).await?;
    assert!(alices_view.get("authorization_code").is_none(), "the researcher gets the code from the supplier, not the portal");
    let (_, rival) = other_supplier.get("/api/v1/leases").await?;
    assert_eq!(rival.as_array().map(Vec::len), Some(0), "{rival}");

    let (status, body) = alice.post(&format!("/api/v1/leases/{lease_a}/verify"), json!({"authorization_code": "AAAAAAAAAAAAAAAA"})).await?;
    assert_eq!((status, Api::code(&body)), (StatusCode::FORBIDDEN, "AUTH_CODE_MISMATCH"), "{body}");
    let (status, verified) = alice.post(&format!("/api/v1/leases/{lease_a}/verify"), json!({"authorization_code": code.to_lowercase()})).await?;
    assert_eq!((status, verified["state"].as_str()), (StatusCode::OK, Some("active")), "{verified}");
    let (_, spend) = alice.get("/api/v1/me/spend").await?;
    assert_eq!(spend["committed"]["CNY"].as_i64(), Some(2 * 2 * 1200 + 4 * 500_000), "{spend}");

    // What suppliers write is shown escaped: a title cannot inject markup.
    let mut hostile = support::listing("<script>alert(1)</script>", "A100 80GB", "Beijing", "B");
    hostile["usage_instructions"] = json!("");
    let (status, body) = supplier.send(reqwest::Method::PUT, &format!("/api/v1/supplier/clusters/{class_b}/listing"), Some(hostile)).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let html = reqwest::get(format!("{}/?region=Beijing", w.portal.url)).await?.text().await?;
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !html.contains("<script>alert"), "escaped in the page");

    // Delisting hides the cluster from researchers, not from its supplier.
    let (status, _) = alice.post(&format!("/api/v1/supplier/clusters/{class_b}/delist"), json!({})).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = supplier.post(&format!("/api/v1/supplier/clusters/{class_a}/delist"), json!({})).await?;
    assert_eq!((status, body["delisted"].as_bool()), (StatusCode::OK, Some(true)), "{body}");
    let (_, lease) = alice.get(&format!("/api/v1/leases/{lease_a}")).await?;
    assert_eq!(lease["state"], "active", "a delisted cluster takes no new lease but keeps its leases");
    let (_, page) = alice.get("/api/v1/catalogue?class=A&include_delisted=true").await?;
    assert_eq!(page["total"], 0, "researchers never see delisted clusters: {page}");
    let (_, page) = supplier.get("/api/v1/catalogue?class=A&include_delisted=true").await?;
    assert_eq!(ids(&page["clusters"], "cluster_id"), [class_a], "its supplier does: {page}");
    let (status, body) = bob.post("/api/v1/leases", json!({"cluster_id": class_a, "node_ids": [node], "billing_mode": "monthly", "periods": 1})).await?;
    assert_eq!((status, Api::code(&body)), (StatusCode::CONFLICT, "CLUSTER_DELISTED"), "{body}");

    // Operators: a dispatcher sees every lease and ends one (the broker checks the role the
    // portal says it acts in); an auditor sees none.
    let (dispatcher, _) = support::operator(w, &w.database_url(), "disp_li", "dispatcher").await?;
    let (status, all) = dispatcher.get("/api/v1/leases").await?;
    assert_eq!(status, StatusCode::OK, "{all}");
    let seen = ids(&all, "lease_id");
    assert!(seen.contains(&lease_a) && seen.contains(&lease_b), "{all}");
    let (status, ended) = dispatcher.post(&format!("/api/v1/leases/{lease_b}/end"), json!({})).await?;
    assert_eq!((status, ended["state"].as_str(), ended["end_reason"].as_str()), (StatusCode::OK, Some("ended"), Some("by_operator")), "{ended}");
    let (auditor, _) = support::operator(w, &w.database_url(), "aud_wang", "auditor").await?;
    let (status, _) = auditor.get("/api/v1/leases").await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = auditor.post(&format!("/api/v1/leases/{lease_a}/end"), json!({})).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "auditors read the log, nothing else");

    jobs(&alice, &bob).await?;

    // Deregistering leaves no live lease behind.
    let (status, _) = alice.send(reqwest::Method::DELETE, "/api/v1/me", Some(json!({"password": support::PASSWORD}))).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let mut platform = w.platform().await?;
    for lease in [lease_a, lease_b] {
        let l = platform.get_lease(v1::GetLeaseRequest { lease_id: lease }).await?.into_inner();
        assert_eq!(l.state(), v1::LeaseState::Ended, "lease {lease}");
    }

    routes(w, &bob, &supplier).await
}

/// Jobs through the portal (no scheduler runs here, so they stay queued): every bad field
/// listed, submit, list, cancel once, a stranger sees nothing; the month's statement.
async fn jobs(alice: &Api, bob: &Api) -> anyhow::Result<()> {
    let bad = json!({"spec": {"name": "", "kind": "training", "resources": {"cards": 0}, "run": {"command": {"program": "/bin/true"}}}});
    let (status, body) = alice.post("/api/v1/jobs", bad).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let bad_fields = fields(&body);
    assert!(bad_fields.contains(&"name".to_owned()) && bad_fields.contains(&"resources.cards".to_owned()), "{body}");
    let (status, body) = alice.post("/api/v1/jobs", json!({"spec": {"name": "x", "kind": "painting"}})).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an unknown kind: {body}");
    let spec = json!({"name": "resnet", "kind": "training", "resources": {"cards": 1}, "run": {"command": {"program": "/bin/true"}}});
    let (status, job) = alice.post("/api/v1/jobs", json!({"spec": spec, "request_id": "first"})).await?;
    assert_eq!((status, job["state"].as_str()), (StatusCode::CREATED, Some("queued")), "{job}");
    let id = job["job_id"].as_u64().unwrap_or_default();
    let (_, again) = alice.post("/api/v1/jobs", json!({"spec": spec, "request_id": "first"})).await?;
    assert_eq!(again["job_id"].as_u64(), Some(id), "the same request id submits once");
    let (_, list) = alice.get("/api/v1/jobs").await?;
    assert_eq!(ids(&list, "job_id"), [id], "{list}");
    let (status, _) = bob.get(&format!("/api/v1/jobs/{id}")).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "another researcher's job does not exist for bob");
    // The form's text may be YAML; a text that is neither YAML nor JSON is named as the problem.
    let yaml = "name: from-yaml\nkind: training\nresources:\n  cards: 1\nrun:\n  command:\n    program: /bin/true\n";
    let (status, from_yaml) = bob.post("/api/v1/jobs", json!({"spec": yaml, "request_id": "yaml"})).await?;
    assert_eq!((status, from_yaml["name"].as_str()), (StatusCode::CREATED, Some("from-yaml")), "{from_yaml}");
    let (status, body) = bob.post("/api/v1/jobs", json!({"spec": "name: [unclosed", "request_id": "broken"})).await?;
    assert_eq!((status, fields(&body)), (StatusCode::BAD_REQUEST, vec!["spec".to_owned()]), "{body}");
    let (status, _) = bob.post(&format!("/api/v1/jobs/{id}/cancel"), json!({})).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, cancelled) = alice.post(&format!("/api/v1/jobs/{id}/cancel"), json!({})).await?;
    assert_eq!((status, cancelled["state"].as_str()), (StatusCode::OK, Some("cancelled")), "{cancelled}");
    let (status, body) = alice.post(&format!("/api/v1/jobs/{}/cancel", id), json!({"again": true})).await?;
    assert!(status == StatusCode::OK || Api::code(&body) == "JOB_TRANSITION", "a retried cancel is the same cancel or refused: {status} {body}");
    // The statement of this month holds the lease charges and the job.
    let month = {
        let (_, me) = alice.get("/api/v1/me/spend").await?;
        assert!(me["balance"]["held_minor"].as_i64().unwrap_or(-1) >= 0, "{me}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
        suanli_types::Month::containing(suanli_types::Timestamp::from_millis(now)).to_string()
    };
    let (status, st) = alice.get(&format!("/api/v1/me/statement?month={month}")).await?;
    assert_eq!(status, StatusCode::OK, "{st}");
    assert_eq!(st["deposits_minor"].as_i64(), Some(suanli_testkit::fixtures::RESEARCHER_FUNDS), "{st}");
    assert_eq!(ids(&st["jobs"], "job_id"), [id], "{st}");
    let (status, body) = alice.get("/api/v1/me/statement?month=2026-13").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    Ok(())
}

/// Every route of the OpenAPI document: anonymous callers get 401 where a login is needed,
/// researchers 403 on supplier and operator routes, suppliers 403 on researcher and operator ones.
/// And the researchers' pages: anonymous viewers go to log in, suppliers get 403.
async fn routes(w: &World, researcher: &Api, supplier: &Api) -> anyhow::Result<()> {
    let anon = w.client();
    let (_, doc) = anon.get("/api/v1/openapi.json").await?;
    let public = [
        "/api/v1/accounts",
        "/api/v1/phone-codes",
        "/api/v1/activation",
        "/api/v1/session",
        "/api/v1/session/totp",
        "/api/v1/password-reset",
        "/api/v1/password-reset/confirm",
        "/api/v1/catalogue",
        "/api/v1/federation/catalogue",
        "/api/v1/federation/members",
        "/api/v1/demos",
    ];
    let researcher_only = [
        "post /api/v1/leases",
        "post /api/v1/leases/{id}/verify",
        "post /api/v1/leases/{id}/password",
        "post /api/v1/leases/{id}/extend",
        "post /api/v1/me/ssh-keys",
        "post /api/v1/jobs",
        "get /api/v1/jobs",
        "get /api/v1/jobs/{id}",
        "post /api/v1/jobs/{id}/cancel",
        "get /api/v1/jobs/{id}/log",
        "get /api/v1/jobs/{id}/curves",
        "get /api/v1/jobs/{id}/outputs/{name}",
        "post /api/v1/leases/{id}/ssh-certificate",
        "get /api/v1/datasets",
        "post /api/v1/datasets",
        "get /api/v1/datasets/{id}",
        "post /api/v1/datasets/{id}/versions",
        "put /api/v1/datasets/{id}/shares/{username}",
        "post /api/v1/uploads",
        "get /api/v1/models",
        "post /api/v1/models",
        "get /api/v1/models/{name}",
        "post /api/v1/models/{name}/promote",
    ];
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in ops.as_object().into_iter().flatten() {
            let concrete = path.replace("{id}", "1").replace("{user_id}", "1").replace("{name}", "model.bin");
            let m: reqwest::Method = method.to_uppercase().parse()?;
            let tag = op["tags"][0].as_str().unwrap_or_default();
            let key = format!("{method} {path}");
            let is_public = public.contains(&path.as_str()) && !(path == "/api/v1/session" && method == "delete") || path.starts_with("/api/v1/clusters/");
            let (status, body) = anon.send(m.clone(), &concrete, Some(json!({}))).await?;
            if is_public {
                assert_ne!(status, StatusCode::UNAUTHORIZED, "{key} is public: {body}");
            } else {
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{key} without login: {body}");
                // A HEAD answer has no body to carry the code (tus' HEAD /uploads/{id}).
                if method != "head" {
                    assert_eq!(Api::code(&body), "UNAUTHENTICATED", "{key}: {body}");
                }
            }
            if tag == "supplier" || tag == "operator" {
                let (status, body) = researcher.send(m.clone(), &concrete, Some(json!({}))).await?;
                assert_eq!(status, StatusCode::FORBIDDEN, "{key} as a researcher: {body}");
            }
            if tag == "operator" || researcher_only.contains(&key.as_str()) {
                let (status, body) = supplier.send(m.clone(), &concrete, Some(json!({}))).await?;
                assert_eq!(status, StatusCode::FORBIDDEN, "{key} as a supplier: {body}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} operations in the OpenAPI document");

    // The researchers' pages: anonymous viewers are sent to log in, suppliers refused.
    let no_redirects = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    for page in ["/jobs", "/datasets", "/datasets/1", "/models", "/models/digits-cls"] {
        let res = no_redirects.get(format!("{}{page}", w.portal.url)).send().await?;
        let location = res.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(res.status() == StatusCode::SEE_OTHER && location.starts_with("/login?next="), "{page} without login: {} {location}", res.status());
        let res = supplier.http.get(format!("{}{page}", w.portal.url)).send().await?;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{page} as a supplier");
    }
    for (page, status) in
        [("/datasets", StatusCode::OK), ("/models", StatusCode::OK), ("/datasets/1", StatusCode::NOT_FOUND), ("/models/digits-cls", StatusCode::NOT_FOUND)]
    {
        let res = researcher.http.get(format!("{}{page}", w.portal.url)).send().await?;
        assert_eq!(res.status(), status, "{page} as a researcher");
    }
    Ok(())
}

#[tokio::test]
async fn market_on_sqlite() -> anyhow::Result<()> {
    market(Backend::Sqlite).await
}

#[tokio::test]
async fn market_on_postgres() -> anyhow::Result<()> {
    market(Backend::Postgres).await
}
