//! Criterion benches, each beside the peer tool where there is one, in the same run.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main};

mod hydrate;

criterion_group!(benches, hydrate::chain_12_deep);
criterion_main!(benches);
