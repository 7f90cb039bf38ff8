//! Mizzen's sidecar proxy. So far: [`init`], the pod's traffic capture.
pub mod init;
