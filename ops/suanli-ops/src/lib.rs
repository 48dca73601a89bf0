//! `suanli-ops`: operations tooling. Today: installing the supplier agent on a host over SSH
//! (`remote.rs`: host-key checking, authentication, commands, uploads; `install.rs`: what goes
//! where, systemd or a supervisor loop, waiting for enrollment).

pub mod install;
pub mod remote;
