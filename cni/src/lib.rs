//! The capture side of the mesh: the chained CNI plugin `ambit-cni` a container runtime calls for
//! every pod, and the node agent `cni-agent` that decides enrollment, installs the in-pod
//! redirection and hands captured pods to ztunnel over ZDS.

pub mod agent;
pub mod install;
pub mod plugin;
pub mod protocol;
