//! `suanli`, the researcher's command line, over the portal's REST API with an API token:
//! log in once, search the catalogue with a typed query language, lease, submit jobs and watch
//! their output, log in to a lease's nodes with OpenSSH (`ssh`, `vnc`), push and pull datasets
//! (`pack`, `upload`, `data`) and register, compare and pull models (`models`). Everything it
//! calls is an operation of the portal's OpenAPI document.

pub mod client;
pub mod config;
pub mod data;
pub mod images;
pub mod models;
pub mod pack;
pub mod query;
pub mod ssh;
pub mod table;
pub mod upload;
