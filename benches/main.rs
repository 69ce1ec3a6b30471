//! Criterion benches, each beside the peer tool where there is one, in the same run.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main};

mod chain;
mod fixture;
mod hydrate;
mod nbd;
mod target;
mod verify;
mod writer;

criterion_group!(
    benches,
    hydrate::chain_12_deep,
    verify::hydrate_verified,
    nbd::convert_12_deep,
    chain::benches,
    writer::benches,
    target::benches
);
criterion_main!(benches);
