//! The workload and service index proxies route by, with endpoint choice.
//!
//! Both proxies keep the same view of the mesh, fed by the `istio.workload.Address` resources of
//! the delta xDS stream (see `ambit-xds`): ztunnel to route every captured connection, the
//! waypoint to dispatch on a request's destination and pick the endpoint it forwards to.
//!
//! - [`StateIndex`]: every [`Workload`] and [`Service`], validated once on arrival (errors name
//!   the resource and the field) and indexed for the per-connection lookups: an address by
//!   `(network, ip)` ([`StateIndex::find_address`]: a service VIP wins over a workload IP), a
//!   service by `namespace/hostname` ([`StateIndex::service`]), a workload by uid or, on the
//!   local node, by namespace and pod name; and endpoint choice
//!   ([`StateIndex::pick_endpoint`]) honouring health, the service's load-balancing preferences
//!   and its port mapping ([`ServicePort`], with the port's [`AppProtocol`]).
//! - [`Addresses`]: the cheap-to-clone handle a proxy's tasks share: a read guard on the index,
//!   [`Addresses::apply`] for xDS upserts and removals (per-resource rejection, last good version
//!   kept), and a generation watchers subscribe to.
//! - [`route::route`]: where an outbound connection goes (an endpoint, a waypoint, plain TCP or
//!   passthrough), the decision ztunnel makes per connection and `ambitctl explain` reports.
//! - [`dump`]: workloads and services as JSON in upstream ztunnel's `/config_dump` shape.
#![forbid(unsafe_code)]

mod addresses;
pub mod dump;
mod index;
pub mod route;

pub use addresses::{AddressError, Addresses, insert_address};
pub use index::{
    Address, AppProtocol, GatewayAddress, GatewayDestination, LoadBalancing, LoadBalancingMode,
    Locality, PortMap, PreferenceScope, Protocol, Service, ServicePort, StateError, StateIndex,
    Workload, shared_scopes,
};
