//! `suanli-portal`: the web portal and REST API for researchers, suppliers and operators.
//!
//! The only crate that knows SQL and the only home of personal data: the broker knows people by
//! opaque account IDs. See ARCHITECTURE.md ("portal") for the map; in short:
//!
//! - `api::*` — REST handlers and the service functions pages reuse; `error` — the one error format;
//! - `pages::*` — server-rendered HTML (maud) and the embedded script that submits forms as JSON;
//! - `auth` — sessions, API tokens, CSRF; `model` — kinds, states, roles and permissions;
//! - `crypto` — sealing personal data, keyed hashes, token hashes; `identity` — ID/credit-code rules;
//! - `market` — broker clients and the catalogue cache fed by the broker's event stream;
//! - `db` — the schema and one set of queries for SQLite and PostgreSQL; `outbox` — durable mail;
//! - `datasets` — uploads, dataset versions by content, archives (`api::datasets`, `api::models`);
//! - `image_search` — image libraries, their vector indexes and the indexer (`api::image_search`);
//! - `audit` — the middleware that records every write; `i18n` — the message catalogue.

pub mod alerts;
pub mod annotation;
pub mod api;
pub mod app;
pub mod artifacts;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod crypto;
pub mod datasets;
pub mod db;
pub mod demo;
pub mod error;
pub mod federation;
pub mod i18n;
pub mod identity;
pub mod image_search;
pub mod market;
pub mod metrics;
pub mod model;
pub mod outbox;
pub mod pages;
pub mod services;
pub mod state;
pub mod tunnels;
