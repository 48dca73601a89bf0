//! A researcher's datasets and models: lists, a dataset's versions, labels, pictures, rejected
//! files and shares with the uploader (`static/app.js`: tus uploads that pause and resume), and
//! a model's versions with promote, compare and download. Read through the REST API's service
//! functions (`api::datasets`, `api::models`); every write goes to the REST API.

use axum::extract::{OriginalUri, State};
use axum::http::HeaderMap;
use axum::response::Response;
use maud::{html, Markup};

use super::{api_form, error_page, field, page, urlencode, Ctx};
use crate::api::datasets::{dataset_of, datasets_of, latest_items, version_of, VersionView, UPLOADS_PER_VERSION};
use crate::api::image_search::libraries_of;
use crate::api::models::{model_view, models_of, ModelVersionView};
use crate::api::ApiPath;
use crate::auth::{MaybePrincipal, Principal};
use crate::error::ApiError;
use crate::i18n::{datetime, group, Msg};
use crate::model::UserKind;
use crate::state::AppState;

/// Pictures shown on a dataset's page (its latest version's first files by name).
const THUMBNAILS: usize = 200;

/// The signed-in researcher, or why datasets, models and annotation projects are not for this
/// viewer.
pub(super) fn researcher(ctx: &Ctx) -> Result<Principal, ApiError> {
    let v = ctx.viewer.clone().ok_or_else(ApiError::unauthenticated)?;
    if v.kind != UserKind::Researcher {
        return Err(ApiError::forbidden("datasets, models and annotation projects belong to researchers"));
    }
    Ok(v)
}

/// Bytes for people: `812 B`, `3.1 MiB`.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A file of a version as a URL path: each `/`-separated part percent-encoded on its own
/// (`urlencode` keeps `/`, the only separator a dataset name has).
fn file_url(dataset: u64, version: u32, name: &str, thumbnail: Option<u32>) -> String {
    let path = format!("/api/v1/datasets/{dataset}/versions/{version}/files/{}", urlencode(name));
    match thumbnail {
        Some(edge) => format!("{path}?thumbnail={edge}"),
        None => path,
    }
}

/// The words the uploader shows, in the page's language.
fn uploader_messages(ctx: &Ctx) -> String {
    let t = |m| ctx.t(m);
    serde_json::json!({
        "queued": t(Msg::Queued), "hashing": t(Msg::Hashing), "uploading": t(Msg::Uploading), "paused": t(Msg::Paused),
        "done": t(Msg::Done), "failed": t(Msg::Failed), "choose_first": t(Msg::ChooseFirst), "committing": t(Msg::Committing),
        "some_failed": t(Msg::SomeFailed), "new_version": t(Msg::NewVersionMade), "nothing_changed": t(Msg::NothingChanged),
        "items": t(Msg::Files), "added": t(Msg::Added), "removed": t(Msg::Removed), "modified": t(Msg::Changed),
        "duplicates": t(Msg::Duplicates), "rejected": t(Msg::Rejected), "skipped": t(Msg::Skipped), "empty": t(Msg::EmptyFile),
        "too_many": t(Msg::TooManyFiles),
    })
    .to_string()
}

/// My datasets and those shared with me; a form to create one.
pub async fn datasets_page(State(state): State<AppState>, headers: HeaderMap, OriginalUri(uri): OriginalUri, viewer: MaybePrincipal) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let v = match researcher(&ctx) {
        Ok(v) => v,
        Err(e) => return error_page(&ctx, e),
    };
    let datasets = match datasets_of(&state, &v).await {
        Ok(d) => d,
        Err(e) => return error_page(&ctx, e),
    };
    let items = match latest_items(&state, &datasets).await {
        Ok(i) => i,
        Err(e) => return error_page(&ctx, e),
    };
    let t = |m| ctx.t(m);
    let body = html! {
        @if datasets.is_empty() {
            p.empty { (t(Msg::NoDatasets)) }
        } @else {
            table.datasets {
                thead { tr { th { (t(Msg::Name)) } th { (t(Msg::Owner)) } th { (t(Msg::LatestVersion)) } th { (t(Msg::Files)) } th { (t(Msg::Description)) } } }
                tbody {
                    @for d in &datasets {
                        tr data-dataset=(d.dataset_id) {
                            td { a href={ "/datasets/" (d.dataset_id) } { (d.name) } }
                            td { (d.owner) @if !d.mine { " (" (t(Msg::SharedWithMe)) ")" } }
                            td { @if d.latest_version > 0 { "v" (d.latest_version) } @else { "—" } }
                            td.items { (items.get(&d.dataset_id).map(|n| group(*n)).unwrap_or_else(|| "—".into())) }
                            td { (d.description) }
                        }
                    }
                }
            }
        }
        h2 { (t(Msg::NewDataset)) }
        (api_form("/api/v1/datasets", "POST", Some("/datasets/{dataset_id}"), None, t(Msg::NewDataset), html! {
            (field(t(Msg::Name), "name", "text", "", true))
            label { span { (t(Msg::Description)) } textarea name="description" rows="2" {} small.problem data-for="description" {} }
        }))
    };
    page(&ctx, t(Msg::Datasets), body)
}

/// A dataset: its versions, the latest version's labels, pictures and rejected files, its
/// shares, and (for its owner) the uploader that makes the next version.
pub async fn dataset_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    viewer: MaybePrincipal,
    ApiPath(id): ApiPath<u64>,
) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let v = match researcher(&ctx) {
        Ok(v) => v,
        Err(e) => return error_page(&ctx, e),
    };
    let d = match dataset_of(&state, &v, id).await {
        Ok(d) => d,
        Err(e) => return error_page(&ctx, e),
    };
    let latest = if d.latest_version > 0 {
        match version_of(&state, &v, id, d.latest_version).await {
            Ok(l) => Some(l),
            Err(e) => return error_page(&ctx, e),
        }
    } else {
        None
    };
    let t = |m| ctx.t(m);
    let versions = d.versions.as_deref().unwrap_or_default();
    let body = html! {
        dl.facts data-refresh="facts" {
            dt { (t(Msg::Owner)) } dd.owner { (d.owner) }
            @if !d.description.is_empty() { dt { (t(Msg::Description)) } dd { (d.description) } }
            dt { (t(Msg::Created)) } dd { (datetime(d.created_ms, ctx.lang)) }
            dt { (t(Msg::LatestVersion)) } dd.latest data-version=(d.latest_version) { @if d.latest_version > 0 { "v" (d.latest_version) } @else { "—" } }
        }
        section.versions data-refresh="versions" {
            h2 { (t(Msg::Versions)) }
            @if versions.is_empty() {
                p.empty { (t(Msg::NoVersions)) }
            } @else {
                table.versions {
                    thead { tr {
                        th { (t(Msg::Version)) } th { (t(Msg::Message)) } th { (t(Msg::Files)) } th { (t(Msg::Bytes)) }
                        th { (t(Msg::Added)) } th { (t(Msg::Removed)) } th { (t(Msg::Changed)) } th { (t(Msg::Created)) }
                    } }
                    tbody {
                        @for s in versions.iter().rev() {
                            tr data-version=(s.version) data-items=(s.items) {
                                td { "v" (s.version) } td { (s.message) } td { (group(s.items)) } td { (size(s.bytes)) }
                                td { (group(s.added)) } td { (group(s.removed)) } td { (group(s.modified)) } td { (datetime(s.created_ms, ctx.lang)) }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(l) = &latest { (latest_version(&ctx, l)) }
        (shares(&ctx, id, d.mine, &d.shared_with))
        @if d.mine { (uploader(&ctx, id)) }
    };
    page(&ctx, &format!("{} · {}", t(Msg::Dataset), d.name), body)
}

/// The latest version's label counts, its first pictures and the files it rejected.
fn latest_version(ctx: &Ctx, l: &VersionView) -> Markup {
    let t = |m| ctx.t(m);
    let files = l.files.as_deref().unwrap_or_default();
    html! {
        section.labels data-refresh="labels" {
            h2 { (t(Msg::LabelCounts)) " · v" (l.version) }
            table.labels {
                thead { tr { th { (t(Msg::Label)) } th { (t(Msg::Count)) } } }
                tbody {
                    @for (label, count) in &l.labels {
                        tr data-label=(label) data-count=(count) {
                            td { @if label.is_empty() { (t(Msg::Unlabelled)) } @else { (label) } } td { (group(*count)) }
                        }
                    }
                }
            }
        }
        section.thumbnails data-refresh="thumbnails" {
            h2 { (t(Msg::Pictures)) " · v" (l.version) @if files.len() > THUMBNAILS { " (" (t(Msg::FirstFiles)) ")" } }
            div.thumbs {
                @for f in files.iter().take(THUMBNAILS) {
                    figure.thumb data-name=(f.name) {
                        a href=(file_url(l.dataset_id, l.version, &f.name, None)) {
                            img loading="lazy" src=(file_url(l.dataset_id, l.version, &f.name, Some(128))) alt=(f.name);
                        }
                        figcaption { (f.name) br; small { (f.width) "×" (f.height) " · " (size(f.size)) } }
                    }
                }
            }
        }
        section.rejected data-refresh="rejected" {
            h2 { (t(Msg::RejectedFiles)) " · v" (l.version) }
            @if l.report.rejected.is_empty() {
                p.empty { (t(Msg::NoRejected)) }
            } @else {
                table.rejected {
                    thead { tr { th { (t(Msg::Name)) } th { (t(Msg::Reason)) } } }
                    tbody {
                        @for r in &l.report.rejected {
                            tr data-name=(r.name) { td { (r.name) } td.reason { (r.reason.strip_prefix(&format!("{}: ", r.name)).unwrap_or(&r.reason)) } }
                        }
                    }
                }
            }
        }
    }
}

fn shares(ctx: &Ctx, id: u64, mine: bool, shared_with: &[String]) -> Markup {
    let t = |m| ctx.t(m);
    html! {
        @if mine {
            section.shares {
                h2 { (t(Msg::Shares)) }
                @if shared_with.is_empty() {
                    p.empty { (t(Msg::NotShared)) }
                } @else {
                    ul.shares {
                        @for user in shared_with {
                            li data-user=(user) {
                                (user)
                                (api_form(&format!("/api/v1/datasets/{id}/shares/{}", urlencode(user)), "DELETE", Some(&format!("/datasets/{id}")), None, t(Msg::Unshare), html! {}))
                            }
                        }
                    }
                }
                (api_form(&format!("/api/v1/datasets/{id}/shares/{{username}}"), "PUT", Some(&format!("/datasets/{id}")), None, t(Msg::Share), html! {
                    (field(t(Msg::ShareWith), "username", "text", "", true))
                }))
            }
        }
    }
}

/// Files and folders to a new version: hashed, sent in resumable pieces, then imported.
fn uploader(ctx: &Ctx, id: u64) -> Markup {
    let t = |m| ctx.t(m);
    html! {
        section.upload data-dataset=(id) data-max-files=(UPLOADS_PER_VERSION) data-messages=(uploader_messages(ctx)) {
            h2 { (t(Msg::UploadFiles)) }
            div.dropzone {
                p { (t(Msg::DropHere)) }
                label.inline { span { (t(Msg::ChooseFiles)) } input type="file" name="files" multiple; }
                label.inline { span { (t(Msg::ChooseFolder)) } input type="file" name="folder" webkitdirectory multiple; }
            }
            label.message { span { (t(Msg::Message)) } input type="text" name="message" maxlength="2000"; }
            label.inline { input type="checkbox" name="labels_from_folders" checked; (t(Msg::LabelsFromFolders)) }
            div.actions {
                button type="button" data-upload="start" { (t(Msg::Upload)) }
                button type="button" data-upload="pause" disabled { (t(Msg::Pause)) }
                button type="button" data-upload="resume" disabled { (t(Msg::Resume)) }
            }
            p.form-error role="alert" {}
            table.upload-files {
                thead { tr { th { (t(Msg::Name)) } th { (t(Msg::Bytes)) } th { (t(Msg::State)) } th { "" } } }
                tbody {}
            }
            output.upload-result {}
        }
    }
}

/// My models: how many versions each has and which serves.
pub async fn models_page(State(state): State<AppState>, headers: HeaderMap, OriginalUri(uri): OriginalUri, viewer: MaybePrincipal) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let v = match researcher(&ctx) {
        Ok(v) => v,
        Err(e) => return error_page(&ctx, e),
    };
    let models = match models_of(&state, &v).await {
        Ok(m) => m,
        Err(e) => return error_page(&ctx, e),
    };
    let t = |m| ctx.t(m);
    let body = html! {
        @if models.is_empty() {
            p.empty { (t(Msg::NoModels)) }
        } @else {
            table.models {
                thead { tr { th { (t(Msg::Name)) } th { (t(Msg::Versions)) } th { (t(Msg::Serving)) } th { (t(Msg::Created)) } } }
                tbody {
                    @for m in &models {
                        tr data-model=(m.name) {
                            td { a href={ "/models/" (urlencode(&m.name)) } { (m.name) } }
                            td { (m.versions) }
                            td.serving { @if let Some(s) = m.serving { "v" (s) } @else { "—" } }
                            td { (datetime(m.created_ms, ctx.lang)) }
                        }
                    }
                }
            }
        }
    };
    page(&ctx, t(Msg::MyModels), body)
}

/// One model: its versions with lineage, metrics and card; promote, compare, download.
pub async fn model_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    viewer: MaybePrincipal,
    ApiPath(name): ApiPath<String>,
) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let v = match researcher(&ctx) {
        Ok(v) => v,
        Err(e) => return error_page(&ctx, e),
    };
    let model = match model_view(&state, &v, &name).await {
        Ok(m) => m,
        Err(e) => return error_page(&ctx, e),
    };
    let t = |m| ctx.t(m);
    let path = urlencode(&model.name);
    let row = |mv: &ModelVersionView| {
        let serving = model.serving == Some(mv.version);
        html! {
            tr data-version=(mv.version) data-serving=(serving) {
                td { "v" (mv.version) }
                td.job data-job=(mv.job_id) { a href={ "/jobs/" (mv.job_id) } { "job-" (mv.job_id) } " · " (mv.job_name) br; small { (mv.output) } }
                td.dataset { (mv.dataset.as_deref().unwrap_or("—")) }
                td { ul.metrics { @for (k, value) in &mv.metrics { li data-metric=(k) { (k) ": " (value) } } } }
                td { (datetime(mv.created_ms, ctx.lang)) }
                td {
                    @if serving {
                        strong.serving { (t(Msg::Serving)) }
                    } @else {
                        (api_form(&format!("/api/v1/models/{path}/promote"), "POST", Some(&format!("/models/{path}")), None, t(Msg::Promote), html! {
                            input type="hidden" name="version" value=(mv.version) data-type="number";
                        }))
                    }
                }
                td { a href={ "/api/v1/models/" (path) "/versions/" (mv.version) "/download" } download=(mv.output) { (t(Msg::Download)) } br; small { code { (mv.sha256.get(..12).unwrap_or(&mv.sha256)) } } }
            }
        }
    };
    let versions: Vec<u32> = model.versions.iter().map(|v| v.version).collect();
    // Its demos, and the leases one could run on.
    let services: Vec<_> =
        crate::api::services::services_of(&state, &v, None).await.unwrap_or_default().into_iter().filter(|s| s.model == model.name).collect();
    let active: Vec<u64> = if state.services.enabled() {
        crate::api::market::my_leases(&state, &v).await.unwrap_or_default().into_iter().filter(|l| l.state == "active").map(|l| l.lease_id).collect()
    } else {
        Vec::new()
    };
    let (a, b) = match versions.as_slice() {
        [.., a, b] => (*a, *b),
        [only] => (*only, *only),
        [] => (0, 0),
    };
    let body = html! {
        p { (t(Msg::Serving)) ": " strong.serving { @if let Some(s) = model.serving { "v" (s) } @else { "—" } } }
        table.model-versions {
            thead { tr {
                th { (t(Msg::Version)) } th { (t(Msg::Job)) } th { (t(Msg::Dataset)) } th { (t(Msg::Metrics)) } th { (t(Msg::Created)) } th { (t(Msg::Serving)) } th { "" }
            } }
            tbody { @for mv in model.versions.iter().rev() { (row(mv)) } }
        }
        @for mv in model.versions.iter().rev() {
            @if !mv.card.is_empty() {
                details.card { summary { (t(Msg::ModelCard)) " · v" (mv.version) } pre { (mv.card) } }
            }
        }
        section.services {
            h2 { (t(Msg::Services)) }
            @if !services.is_empty() { (super::services::services_table(&ctx, &services)) }
            @if state.services.enabled() {
                @if active.is_empty() {
                    p { (t(Msg::NoActiveLease)) }
                } @else {
                    (api_form("/api/v1/services", "POST", Some(&format!("/models/{path}")), None, t(Msg::DeployDemo), html! {
                        input type="hidden" name="model" value=(model.name);
                        label.inline { span { (t(Msg::Version)) } select name="version" data-type="number" { @for n in versions.iter().rev() { option value=(n) { "v" (n) } } } }
                        label.inline { span { (t(Msg::DeployOnLease)) } select name="lease_id" data-type="number" { @for l in &active { option value=(l) { "lease-" (l) } } } }
                        label.inline { span { (t(Msg::WhoMayOpen)) } select name="visibility" {
                            option value="private" { (t(Msg::OnlyMe)) } option value="link" { (t(Msg::AnyoneWithLink)) } option value="public" { (t(Msg::PublicListed)) }
                        } }
                    }))
                }
            }
        }
        @if versions.len() > 1 {
            h2 { (t(Msg::Compare)) }
            form.compare data-api={ "/api/v1/models/" (path) "/compare" } {
                @for (slot, chosen) in [("a", a), ("b", b)] {
                    label.inline {
                        span { (slot) }
                        select name=(slot) { @for n in &versions { option value=(n) selected[*n == chosen] { "v" (n) } } }
                    }
                }
                button type="submit" { (t(Msg::Compare)) }
                p.form-error role="alert" {}
                table.comparison.hidden {
                    thead { tr { th { (t(Msg::Metric)) } th.a { "a" } th.b { "b" } th { (t(Msg::Delta)) } } }
                    tbody {}
                }
            }
        }
    };
    page(&ctx, &format!("{} · {}", t(Msg::Models), model.name), body)
}

/// Similar-image search: the query picture (cropped in the browser by dragging over it), the
/// libraries to search and filters, results with "more like this", and each library's indexing
/// status with the form that adds a dataset version to it. The search itself runs in
/// `static/app.js` (`imageSearch`) against `POST /api/v1/image-search`.
pub async fn image_search_page(State(state): State<AppState>, headers: HeaderMap, OriginalUri(uri): OriginalUri, viewer: MaybePrincipal) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let v = match researcher(&ctx) {
        Ok(v) => v,
        Err(e) => return error_page(&ctx, e),
    };
    let (libraries, datasets) = match (libraries_of(&state, &v).await, datasets_of(&state, &v).await) {
        (Ok(l), Ok(d)) => (l, d),
        (Err(e), _) | (_, Err(e)) => return error_page(&ctx, e),
    };
    let t = |m| ctx.t(m);
    let available = state.image_search.is_some();
    let body = html! {
        @if !available { p.error { (t(Msg::NoEmbedder)) } }
        section.image-search data-image-search="1" data-more=(t(Msg::MoreLikeThis)) {
            form.query {
                label { span { (t(Msg::QueryImage)) } input type="file" name="image" accept="image/jpeg,image/png"; }
                p.hint { (t(Msg::CropHint)) }
                canvas.crop hidden {}
                label { span { (t(Msg::Library)) }
                    select name="library" {
                        option value="all" selected { (t(Msg::LibraryAll)) }
                        option value="mine" { (t(Msg::LibraryMine)) }
                        option value="global" { (t(Msg::LibraryGlobal)) }
                    }
                }
                label { span { (t(Msg::Dataset)) }
                    select name="dataset" {
                        option value="" { "—" }
                        @for d in &datasets { option value=(d.dataset_id) { (d.owner) "/" (d.name) } }
                    }
                }
                label { span { (t(Msg::Label)) } input type="text" name="label"; }
                label { span { (t(Msg::Top)) } input type="number" name="top" value="20" min="1" max="100"; }
                p.form-error role="alert" {}
                button type="submit" disabled[!available] { (t(Msg::SearchImages)) }
            }
            p.took {}
            ol.results {}
        }
        section.libraries data-refresh="libraries" {
            h2 { (t(Msg::Libraries)) }
            table.libraries {
                thead { tr { th { (t(Msg::Library)) } th { (t(Msg::State)) } th { (t(Msg::Indexed)) } th { (t(Msg::Waiting)) } th { (t(Msg::Failed)) } th { (t(Msg::Model)) } } }
                tbody {
                    @for l in &libraries {
                        tr data-library=(l.library) data-state=(l.state) {
                            td { (l.library) }
                            td.state { (l.state) @if let Some(e) = &l.error { br; small.error { (e) } } }
                            td.indexed { (l.indexed) " / " (l.images) }
                            td { (l.waiting) }
                            td { (l.failed) }
                            td { code { (l.model.as_deref().unwrap_or("—")) } }
                        }
                    }
                }
            }
            @for (library, label) in [("mine", t(Msg::AddToMyLibrary)), ("global", t(Msg::ContributeToGlobal))] {
                (api_form(&format!("/api/v1/image-libraries/{library}/datasets"), "POST", None, Some("added,already_present"), label, html! {
                    label { span { (t(Msg::Dataset)) }
                        select name="dataset" data-type="number" required {
                            @for d in &datasets { option value=(d.dataset_id) { (d.owner) "/" (d.name) } }
                        }
                        small.problem data-for="dataset" {}
                    }
                    (field(t(Msg::VersionZeroLatest), "version", "number", "0", false))
                }))
            }
        }
    };
    page(&ctx, t(Msg::ImageSearch), body)
}
