//! Criterion benches, one module per crate.
use criterion::{criterion_group, criterion_main};

mod target;

criterion_group!(benches, target::benches);
criterion_main!(benches);
