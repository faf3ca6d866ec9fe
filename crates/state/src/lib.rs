//! The workload and service index proxies route by, with endpoint choice.
#![forbid(unsafe_code)]
