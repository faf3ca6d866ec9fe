//! Authorization engine with Istio AuthorizationPolicy semantics, shared by ztunnel (L4) and the
//! waypoint (L7).
//!
//! - [`Policy`] is the one model both wire forms are validated into:
//!   [`Policy::from_proto`] for `istio.security.Authorization` (what ztunnel receives) and
//!   [`Policy::from_waypoint`] for `ambit.waypoint.v1.Policy` (what a waypoint receives). Every
//!   conversion error names the policy and the field at fault.
//! - [`ConnectionContext`] is what is known about a connection; its source identity comes only
//!   from a [`VerifiedPeer`](ambit_identity::tls::VerifiedPeer) (or the connection is explicitly
//!   plaintext). [`ConnectionContext::with_request`] attaches an HTTP request
//!   ([`RequestContext`]: method, path without query, host without port, headers).
//! - [`PolicyStore`] holds the policies indexed by where they apply (mesh-wide, namespace,
//!   workload selector, or waypoint targets); [`evaluate`] and [`PolicyStore::authorize`] give a
//!   [`Decision`].
//!
//! # Evaluation
//!
//! 1. any matching DENY policy denies;
//! 2. with no ALLOW policy the traffic is allowed;
//! 3. a matching ALLOW policy allows;
//! 4. otherwise it is denied.
//!
//! AUDIT policies never change the verdict: the ones that matched are listed in
//! [`Decision::audited`] for the caller to count or log. Dry-run policies (any action) are
//! evaluated and listed in [`Decision::dry_run`], never enforced. The decision names the policy
//! and the rule index that decided.
//!
//! # Matching
//!
//! Rules are ORed; within a rule `from`, `to` and each `when` condition are ANDed; values within
//! a field are ORed, and a `not` field fails when any of its values matches. Istio's string forms
//! are `exact`, `prefix*`, `*suffix` and `*` (presence: any non-empty value, or for a header, the
//! header being present). Paths are compared without their query, hosts without their port and
//! ignoring case, header names ignoring case (several values of one header are joined with `,`).
//!
//! # HTTP fields on plain TCP
//!
//! `hosts`, `methods`, `paths`, request headers and their `not` forms need a request. When a
//! policy is evaluated for a connection without one (TCP through a waypoint, or any ztunnel
//! check), we follow Istio: in an ALLOW (or AUDIT) policy a rule that uses such a field does not
//! match, so TCP traffic is not allowed by a rule written for HTTP; in a DENY policy such fields
//! are ignored and the rule's other fields decide, so a deny written for HTTP still denies the
//! TCP traffic it would otherwise cover (deny is the safe side).
#![forbid(unsafe_code)]

mod context;
pub mod dump;
mod policy;
mod store;

pub use context::{ConnectionContext, RequestContext, Subject};
pub use policy::{
    Action, Clause, HeaderMatch, Match, Policy, PolicyError, Rule, Scope, StringMatch, Target,
};
pub use store::{Decision, PolicyMatch, PolicyStore, evaluate};

#[cfg(test)]
mod tests;
