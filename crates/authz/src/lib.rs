//! Authorization engine (Istio AuthorizationPolicy semantics) built only from a verified peer, with L4 and L7 request contexts.
#![forbid(unsafe_code)]

mod policy;

pub use policy::*;
