//! Mizzen's sidecar injector: a mutating admission webhook that adds the
//! mesh to pods ([`inject`] decides and mutates, [`webhook`] speaks
//! AdmissionReview), with its serving certificate and the webhook's
//! `caBundle` managed by itself ([`tls`]), a reloadable template
//! ([`config`]) and manual injection for pipelines ([`manual`]).

pub mod config;
pub mod inject;
pub mod manual;
pub mod tls;
pub mod webhook;
