//! The cluster objects Ambit reads (from Kubernetes or from a directory of the same YAML), with
//! validation that names the object and field at fault, and the ambient enrollment rules. No
//! Kubernetes client here: the CNI agent, istiod-lite and `ambitctl lab` all build on it.

pub mod destination_rule;
pub mod enrollment;
pub mod gateway_api;
pub mod l7;
pub mod objects;
pub mod parse;
pub mod status;
pub mod translate;
mod validate;
pub mod virtual_service;
pub mod warning;
pub mod waypoints;

pub use objects::{Namespace, Object, ObjectKey, ObjectMeta, Pod};
pub use parse::{ObjectError, parse_documents, parse_object, read_dir};
pub use warning::{Warning, WarningKind};
