//! Mizzen's sidecar injector.
pub mod config;
pub mod inject;
pub mod webhook;
