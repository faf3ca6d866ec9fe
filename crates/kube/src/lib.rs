//! Kubernetes plumbing shared by istiod-lite and cni-agent.
