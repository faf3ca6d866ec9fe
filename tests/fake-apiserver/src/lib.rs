//! A scripted Kubernetes API server for tests.
