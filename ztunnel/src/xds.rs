//! ztunnel's xDS subscriptions: `istio.workload.Address` then `istio.security.Authorization`
//! (upstream's order), both applied to [`MeshState`], on the shared delta xDS client.

use ambit_core::metrics::Registry;
use ambit_core::readiness::BlockReady;
use ambit_proto::security as sec;
use ambit_proto::workload as pb;
use ambit_xds::{XdsClient, XdsConfig};

use crate::mesh::MeshState;

/// A client feeding `state`. `ready` is released once both types have been received (ztunnel
/// takes no pods before that, as upstream).
pub fn client(
    config: XdsConfig,
    state: &MeshState,
    metrics: Registry,
    ready: Option<BlockReady>,
) -> XdsClient {
    let addresses = state.clone();
    let policies = state.clone();
    XdsClient::builder(config, metrics)
        .subscribe::<pb::Address>(move |upserts: &[_], removals: &[_]| {
            addresses.apply_addresses(upserts, removals)
        })
        .subscribe::<sec::Authorization>(move |upserts: &[_], removals: &[_]| {
            policies.apply_policies(upserts, removals)
        })
        .ready(ready)
        .build()
}
