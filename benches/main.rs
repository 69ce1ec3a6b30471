//! Criterion benches, one module per crate.
// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]
use criterion::{criterion_group, criterion_main};

mod target;

criterion_group!(benches, target::benches);
criterion_main!(benches);
