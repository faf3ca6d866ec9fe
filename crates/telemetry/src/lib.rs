//! Istio metric label sets, connection and request accounting guards, access-log records.
#![forbid(unsafe_code)]
