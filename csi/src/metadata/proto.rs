//! The SnapshotMetadata gRPC API (KEP-3314, `proto/schema.proto` of
//! kubernetes-csi/external-snapshot-metadata), generated at build time by tonic and prost.
//!
//! [`snapshot_metadata_client::SnapshotMetadataClient`] calls the service;
//! [`snapshot_metadata_server`] lets a Rust program serve it (the tests do).

#![allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]

tonic::include_proto!("snapshotmetadata");
