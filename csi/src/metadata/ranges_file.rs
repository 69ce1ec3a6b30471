//! The changed-ranges file `strata backup --changed-ranges FILE` reads: a JSON array of
//! `{"offset": N, "length": N}` objects, as [`strata_chain::parse_changed_ranges`] parses it.

use std::io::{self, Write};

use serde::Serialize;
use serde::ser::{SerializeStruct, Serializer};
use strata_chain::ByteRange;

struct Entry<'a>(&'a ByteRange);

impl Serialize for Entry<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut entry = serializer.serialize_struct("ByteRange", 2)?;
        entry.serialize_field("offset", &self.0.offset)?;
        entry.serialize_field("length", &self.0.length)?;
        entry.end()
    }
}

/// Writes `ranges` as the changed-ranges JSON file, one range per line.
pub fn write_changed_ranges(mut out: impl Write, ranges: &[ByteRange]) -> io::Result<()> {
    let mut buffered = io::BufWriter::new(&mut out);
    buffered.write_all(b"[")?;
    for (i, range) in ranges.iter().enumerate() {
        buffered.write_all(if i == 0 { b"\n" } else { b",\n" })?;
        serde_json::to_writer(&mut buffered, &Entry(range))?;
    }
    buffered.write_all(b"\n]\n")?;
    buffered.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_chain::parse_changed_ranges;

    #[test]
    fn the_file_parses_back_to_the_same_ranges() {
        let ranges = [
            ByteRange {
                offset: 0,
                length: 4096,
            },
            ByteRange {
                offset: 1 << 40,
                length: u64::MAX - (1 << 40),
            },
        ];
        let mut file = Vec::new();
        write_changed_ranges(&mut file, &ranges).unwrap();
        assert_eq!(
            String::from_utf8(file.clone()).unwrap(),
            "[\n{\"offset\":0,\"length\":4096},\n{\"offset\":1099511627776,\"length\":18446742974197923839}\n]\n"
        );
        assert_eq!(parse_changed_ranges(&file).unwrap(), ranges);
        let mut empty = Vec::new();
        write_changed_ranges(&mut empty, &[]).unwrap();
        assert_eq!(parse_changed_ranges(&empty).unwrap(), []);
    }
}
