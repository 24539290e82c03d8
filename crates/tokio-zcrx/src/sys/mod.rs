//! Operating-system helpers: memory mappings, fork safety, netlink, socket claims.

pub(crate) mod claim;
pub(crate) mod fork;
pub(crate) mod mem;
pub(crate) mod netlink;
