//! `suanli-ops`: operations tooling. Installing the supplier agent on a host over SSH
//! (`remote.rs`: host-key checking, authentication, commands, uploads; `install.rs`: what goes
//! where, systemd or a supervisor loop, waiting for enrollment), and backups of the whole
//! platform (`backup.rs`: portal, broker and artifacts under one manifest, retention, off-site).

pub mod backup;
pub mod install;
pub mod remote;
