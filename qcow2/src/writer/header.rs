//! The header cluster: header fields, header extensions and the backing file name
//! (qcow2.rst, "Header", "Header extensions").

use super::options::{Compat, WriterOptions};
use crate::CompressionType;
use crate::error::Error;

const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Version 2 header length (qcow2.rst: "exactly 72 bytes").
const V2_HEADER_LEN: usize = 72;
/// Version 3 header length with the `compression_type` byte, padded to a multiple of 8.
const V3_HEADER_LEN: usize = 112;
/// Header extension type: backing file format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Longest backing file name (qcow2.rst, `backing_file_size`).
const MAX_BACKING_NAME: usize = 1023;
/// Incompatible feature bit 3: `compression_type` is not deflate.
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
/// `refcount_order` for 16-bit refcounts.
pub(crate) const REFCOUNT_ORDER: u32 = 4;

/// Where the metadata landed, as the header records it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeaderFields {
    pub(crate) virtual_size: u64,
    pub(crate) l1_size: u32,
    pub(crate) l1_table_offset: u64,
    pub(crate) refcount_table_offset: u64,
    pub(crate) refcount_table_clusters: u32,
}

/// Builds the first cluster's used bytes; fails early (before any data is written) when the
/// backing file name does not fit, by calling it with placeholder fields.
pub(crate) fn encode(options: &WriterOptions, fields: &HeaderFields) -> Result<Vec<u8>, Error> {
    let header_len = match options.compat {
        Compat::V2 => V2_HEADER_LEN,
        Compat::V3 => V3_HEADER_LEN,
    };
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(MAGIC);
    put32(&mut out, options.compat.version());
    put64(&mut out, 0); // backing_file_offset, patched below
    put32(&mut out, 0); // backing_file_size, patched below
    put32(&mut out, options.cluster_bits());
    put64(&mut out, fields.virtual_size);
    put32(&mut out, 0); // crypt_method: none
    put32(&mut out, fields.l1_size);
    put64(&mut out, fields.l1_table_offset);
    put64(&mut out, fields.refcount_table_offset);
    put32(&mut out, fields.refcount_table_clusters);
    put32(&mut out, 0); // nb_snapshots
    put64(&mut out, 0); // snapshots_offset
    if options.compat == Compat::V3 {
        let compression = options.header_compression();
        let incompatible = if compression == CompressionType::Deflate {
            0
        } else {
            INCOMPAT_COMPRESSION_TYPE
        };
        put64(&mut out, incompatible);
        put64(&mut out, 0); // compatible_features
        put64(&mut out, 0); // autoclear_features
        put32(&mut out, REFCOUNT_ORDER);
        put32(&mut out, header_len as u32);
        out.push(match compression {
            CompressionType::Deflate => 0,
            CompressionType::Zstd => 1,
        });
        out.resize(header_len, 0);
    }
    debug_assert_eq!(out.len(), header_len);

    if options.backing_file.is_some() {
        put_extension(
            &mut out,
            EXT_BACKING_FORMAT,
            options.backing_format.as_bytes(),
        );
    }
    put32(&mut out, 0); // end of the header extension area
    put32(&mut out, 0);

    if let Some(name) = &options.backing_file {
        if name.is_empty() || name.len() > MAX_BACKING_NAME {
            return Err(Error::InvalidOption {
                option: format!("backing_file={name}"),
                reason: "the name must be 1 to 1023 bytes long",
            });
        }
        let offset = out.len() as u64;
        out.extend_from_slice(name.as_bytes());
        out[8..16].copy_from_slice(&offset.to_be_bytes());
        out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    }
    if out.len() as u64 > options.cluster_size {
        return Err(Error::InvalidOption {
            option: format!("cluster_size={}", options.cluster_size),
            reason: "the header, extensions and backing file name do not fit in the first cluster",
        });
    }
    Ok(out)
}

fn put_extension(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    put32(out, kind);
    put32(out, data.len() as u32);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(8), 0);
}

fn put32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: HeaderFields = HeaderFields {
        virtual_size: 1 << 30,
        l1_size: 2,
        l1_table_offset: 0x30000,
        refcount_table_offset: 0x40000,
        refcount_table_clusters: 1,
    };

    #[test]
    fn v3_overlay_header_layout() {
        let options = WriterOptions {
            backing_file: Some("base.qcow2".to_owned()),
            ..WriterOptions::default()
        };
        let bytes = encode(&options, &FIELDS).unwrap();
        assert_eq!(&bytes[..8], b"QFI\xfb\0\0\0\x03");
        assert_eq!(u32::from_be_bytes(bytes[100..104].try_into().unwrap()), 112);
        // Backing-format extension right after the header, then the end marker, then the name.
        assert_eq!(&bytes[112..120], &[0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 5]);
        assert_eq!(&bytes[120..125], b"qcow2");
        assert_eq!(&bytes[128..136], &[0; 8]);
        assert_eq!(u64::from_be_bytes(bytes[8..16].try_into().unwrap()), 136);
        assert_eq!(&bytes[136..], b"base.qcow2");
    }

    #[test]
    fn zstd_sets_the_incompatible_bit_and_type() {
        let options = WriterOptions {
            compression_type: CompressionType::Zstd,
            ..WriterOptions::default()
        };
        let bytes = encode(&options, &FIELDS).unwrap();
        assert_eq!(u64::from_be_bytes(bytes[72..80].try_into().unwrap()), 8);
        assert_eq!(bytes[104], 1);
    }

    #[test]
    fn long_backing_names_are_refused() {
        let mut options = WriterOptions {
            backing_file: Some("x".repeat(1024)),
            ..WriterOptions::default()
        };
        assert!(matches!(
            encode(&options, &FIELDS),
            Err(Error::InvalidOption { .. })
        ));
        options.backing_file = Some("x".repeat(400));
        options.cluster_size = 512;
        assert!(matches!(
            encode(&options, &FIELDS),
            Err(Error::InvalidOption { .. })
        ));
    }
}
