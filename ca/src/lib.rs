//! Mizzen's certificate authority.
pub mod csr;
