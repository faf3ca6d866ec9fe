//! Delta xDS client generic over resource types, and the control-plane connection (TLS, token, backoff).
#![forbid(unsafe_code)]
