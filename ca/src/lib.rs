//! Mizzen's certificate authority.
pub mod authority;
pub mod csr;
