//! `ambitctl analyze`: problems in mesh configuration, each with a stable code, a severity, the
//! object and field at fault and a fix hint.
