//! Criterion benches.
use criterion::{Criterion, criterion_group, criterion_main};

mod writer;

fn placeholder(_c: &mut Criterion) {}

criterion_group!(benches, placeholder, writer::benches);
criterion_main!(benches);
