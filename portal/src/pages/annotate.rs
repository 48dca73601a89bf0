//! Crowdsourced annotation pages: the projects a researcher owns, works on or may join; a
//! project's page (annotators: the next task and their own; owner and reviewers: the dashboard
//! and the conflicts to decide); and the annotation tool itself (`static/annotate.js`). Read
//! through the REST API's service functions (`api::annotation`); every write goes to the API.

use axum::extract::{OriginalUri, State};
use axum::http::HeaderMap;
use axum::response::Response;
use maud::html;
use suanli_annotation::ShapeKind;

use super::data::researcher;
use super::{error_page, page, Ctx};
use crate::annotation::{self as ann, Role};
use crate::api::annotation::{projects_of, ProjectView};
use crate::api::ApiPath;
use crate::auth::MaybePrincipal;
use crate::i18n::Msg;
use crate::state::AppState;

pub const ANNOTATE_JS: &str = include_str!("../../static/annotate.js");

fn role_name(role: Option<Role>) -> &'static str {
    role.map_or("—", Role::as_str)
}

pub async fn projects_page(State(state): State<AppState>, headers: HeaderMap, OriginalUri(uri): OriginalUri, viewer: MaybePrincipal) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let v = match researcher(&ctx) {
        Ok(v) => v,
        Err(e) => return error_page(&ctx, e),
    };
    let projects = match projects_of(&state, &v).await {
        Ok(p) => p,
        Err(e) => return error_page(&ctx, e),
    };
    let t = |m| ctx.t(m);
    let body = html! {
        @if projects.is_empty() { p { (t(Msg::NoProjects)) } }
        @else {
            table.projects {
                thead { tr { th { (t(Msg::Name)) } th { (t(Msg::Role)) } th { (t(Msg::Progress)) } } }
                tbody {
                    @for p in &projects {
                        tr { td { a href={ "/annotation/" (p.id) } { (p.owner) "/" (p.name) } } td { (role_name(p.role)) } td { (p.slots_submitted) " / " (p.slots_total) } }
                    }
                }
            }
        }
    };
    page(&ctx, t(Msg::AnnotationProjects), body)
}

fn percent(score: Option<f64>) -> String {
    score.map_or_else(|| "—".into(), |s| format!("{:.0} %", s * 100.0))
}

pub async fn project_page(
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
    let project: ProjectView = match crate::api::annotation::get(State(state.clone()), crate::auth::Researcher(v.clone()), ApiPath(id)).await {
        Ok(axum::Json(p)) => p,
        Err(e) => return error_page(&ctx, e),
    };
    let t = |m| ctx.t(m);
    let reviewing = matches!(project.role, Some(Role::Owner | Role::Reviewer));
    let mine = if project.role == Some(Role::Annotator) {
        match crate::api::annotation::my_slots(State(state.clone()), crate::auth::Researcher(v.clone()), ApiPath(id)).await {
            Ok(axum::Json(s)) => s,
            Err(e) => return error_page(&ctx, e),
        }
    } else {
        Vec::new()
    };
    let board = if reviewing {
        match crate::api::annotation::dashboard(State(state.clone()), crate::auth::Researcher(v.clone()), ApiPath(id)).await {
            Ok(axum::Json(b)) => Some(b),
            Err(e) => return error_page(&ctx, e),
        }
    } else {
        None
    };
    let body = html! {
        p { (project.owner) "/" (project.name) " · " (project.images) " images · " (project.tasks) " tasks × " (project.overlap) " · " (t(Msg::Role)) ": " (role_name(project.role)) }
        @if project.role.is_none() && project.open_call {
            form.api data-api={ "/api/v1/annotation-projects/" (id) "/join" } data-method="POST" data-next={ "/annotation/" (id) } {
                p.form-error role="alert" {} button type="submit" { "Join" } output.result {}
            }
        }
        @if project.role == Some(Role::Annotator) {
            section.my-tasks {
                button type="button" data-next-task=(id) { (t(Msg::StartAnnotating)) }
                p.form-error role="alert" data-nothing-left=(t(Msg::NothingLeft)) {}
                h2 { (t(Msg::MyTasks)) }
                table {
                    tbody {
                        @for s in &mine {
                            tr { td { a href={ "/annotation/" (id) "/tasks/" (s.task) "/slots/" (s.slot) } { "#" (s.task) "." (s.slot) } } td { (s.state.as_str()) } td { (s.saved) " / " (s.images) } }
                        }
                    }
                }
            }
        }
        @if let Some(b) = &board {
            section.dashboard {
                h2 { (t(Msg::Dashboard)) }
                dl {
                    dt { (t(Msg::ImagesComplete)) } dd.complete { (b.images_complete) " / " (b.images - b.honeypots) }
                    dt { (t(Msg::Agreement)) } dd { (percent(b.agreement)) }
                    dt { (t(Msg::Conflicts)) } dd { (b.conflicts) } dt { (t(Msg::Undecided)) } dd.undecided { (b.undecided) }
                }
                table.annotators {
                    thead { tr { th { (t(Msg::Annotators)) } th { (t(Msg::Progress)) } th { (t(Msg::Agreement)) } th { (t(Msg::HoneypotScore)) } th { (t(Msg::TimeSpent)) } th { (t(Msg::ImagesPerHour)) } } }
                    tbody {
                        @for a in &b.annotators {
                            tr { td { (a.username) } td { (a.slots_submitted) } td { (percent(a.agreement)) } td { (percent(a.honeypot_score)) } td { (a.active_ms / 60_000) " min" } td { (a.images_per_hour.map_or_else(|| "—".into(), |r| format!("{r:.0}"))) } }
                        }
                    }
                }
                p { (t(Msg::Export)) ": " a href={ "/api/v1/annotation-projects/" (id) "/export?format=coco" } { "COCO" } " · " a href={ "/api/v1/annotation-projects/" (id) "/export?format=voc" } { "VOC" } " · " a href={ "/api/v1/annotation-projects/" (id) "/export?format=yolo" } { "YOLO" } }
            }
            section #review data-project=(id) data-accept=(t(Msg::AcceptShape)) data-reject=(t(Msg::RejectObject)) data-missing=(t(Msg::MissingBy)) data-labels-differ=(t(Msg::LabelsDiffer)) data-none=(t(Msg::NoConflicts)) {
                h2 { (t(Msg::Review)) }
                div.conflicts {}
            }
        }
        script src="/static/annotate.js" defer {}
    };
    page(&ctx, &project.name, body)
}

/// The tool's buttons: name in `annotate.js`, the shape kind it draws (shown only where the
/// schema allows it; `None`: always), label.
const TOOLS: [(&str, Option<ShapeKind>, Msg); 7] = [
    ("select", None, Msg::SelectTool),
    ("box", Some(ShapeKind::Box), Msg::BoxTool),
    ("polygon", Some(ShapeKind::Polygon), Msg::PolygonTool),
    ("polyline", Some(ShapeKind::Polyline), Msg::PolylineTool),
    ("points", Some(ShapeKind::Points), Msg::PointsTool),
    ("brush", Some(ShapeKind::Mask), Msg::BrushTool),
    ("eraser", Some(ShapeKind::Mask), Msg::EraserTool),
];

pub async fn tool_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    viewer: MaybePrincipal,
    ApiPath((id, task, slot)): ApiPath<(u64, u64, u64)>,
) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let v = match researcher(&ctx) {
        Ok(v) => v,
        Err(e) => return error_page(&ctx, e),
    };
    let (project, _) = match ann::project_as(&state.db, id, v.user.0, &[Role::Annotator]).await {
        Ok(p) => p,
        Err(e) => return error_page(&ctx, e),
    };
    let schema = serde_json::to_string(&project.schema).unwrap_or_default();
    let t = |m| ctx.t(m);
    let body = html! {
        section #annotator data-project=(id) data-task=(task) data-slot=(slot) data-schema=(schema) {
            div.toolbar {
                @for (tool, kind, name) in TOOLS {
                    @if kind.is_none_or(|kind| project.schema.kinds.contains(&kind)) { button type="button" data-tool=(tool) { (t(name)) } }
                }
                span.labels {
                    @for (i, c) in project.schema.classes.iter().enumerate() {
                        button type="button" data-label=(c.name) style={ "border-color: " (c.colour) } { (i + 1) " " (c.name) }
                    }
                }
                button type="button" data-action="undo" { (t(Msg::Undo)) }
                button type="button" data-action="redo" { (t(Msg::Redo)) }
                button type="button" data-action="delete" { (t(Msg::DeleteShape)) }
                button type="button" data-action="copy" { (t(Msg::CopyPrevious)) }
                button type="button" data-action="accept" { (t(Msg::AcceptPre)) }
                button type="button" data-action="fit" { (t(Msg::FitImage)) }
                button type="button" data-action="prev" { (t(Msg::PreviousImage)) }
                button type="button" data-action="next" { (t(Msg::NextImage)) }
                button type="button" data-action="submit" { (t(Msg::Submit)) }
            }
            p.status { span.image-name {} " · " span.save-state data-state="loading" { "…" } }
            div.workspace {
                canvas width="1000" height="700" {}
                aside { ul.shapes {} div.attributes {} }
            }
            p.hint { (t(Msg::Shortcuts)) }
        }
        script src="/static/annotate.js" defer {}
    };
    page(&ctx, &format!("{} · #{task}.{slot}", project.name), body)
}

pub async fn static_annotate_js() -> Response {
    use axum::response::IntoResponse;
    ([(axum::http::header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (axum::http::header::CACHE_CONTROL, "public, max-age=3600")], ANNOTATE_JS)
        .into_response()
}
