//! The on-disk metadata schema: redb tables of `meta.redb`, their row encodings, and
//! the format version that names them.
//!
//! Everything a volume is made of lives in one redb database (`meta.redb`), made durable
//! by checkpoints and the write journal (see `journal.rs` and `store/checkpoint.rs`).
//! Checksums are read from redb on demand (there is one per 4 KiB block); the rest is
//! small and held in memory by the store (`store/state.rs`).
//!
//! Versioning: the `format` row of table `meta` names the schema ([`FORMAT_VERSION`]),
//! the tables, the row encodings below and the journal records (whose frames carry
//! their own version, `journal::JOURNAL_VERSION`). A store is opened only in the format
//! this build writes; a newer format is refused with
//! [`StorageError::NewerFormat`], so a node never half-reads what a newer node wrote.
//! A change to any of them bumps the version, and the build that bumps it reads the
//! previous format (a rolling upgrade reads what the previous version wrote).

use std::path::{Path, PathBuf};

use redb::TableDefinition;

use crate::error::{Result, StorageError};

/// Key/value pairs: "format" ([`FORMAT_VERSION`]), "next_layer" and "checkpoint".
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// disk id -> encoded [`DiskRecord`].
pub(crate) const DISKS: TableDefinition<u32, &[u8]> = TableDefinition::new("disks");
/// (disk id, byte offset) -> length of a free range below the disk's high-water mark.
pub(crate) const FREE: TableDefinition<(u32, u64), u64> = TableDefinition::new("free");
/// volume name -> encoded [`VolumeRecord`].
pub(crate) const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// (volume, snapshot) -> encoded [`SnapshotRecord`].
pub(crate) const SNAPSHOTS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("snapshots");
/// layer id -> (parent layer id or 0, reference count).
pub(crate) const LAYERS: TableDefinition<u64, (u64, u64)> = TableDefinition::new("layers");
/// (layer id, stripe-unit index) -> (disk id, byte offset), offset [`ZERO_EXTENT`] for a hole.
pub(crate) const EXTENTS: TableDefinition<(u64, u64), (u32, u64)> = TableDefinition::new("extents");
/// (disk id, block group) -> committed crc32c of up to 64 blocks (see `crcs.rs`).
pub(crate) const CRCS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("crcs");
/// (disk id, block group) -> crc32c of recent writes not yet known to be durable everywhere:
/// read in preference to `CRCS`, kept by recovery only where the data matches.
pub(crate) const PENDING: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("pending");

/// volume -> its sequence number before the one write whose checksums are still pending
/// (at most one row: writes are serialised and the next write promotes the previous one).
pub(crate) const INFLIGHT: TableDefinition<&str, u64> = TableDefinition::new("inflight");

/// Version of the schema above, of the row encodings below and of the journal records.
/// Formats 1 and 2 were development formats that no released node wrote.
pub(crate) const FORMAT_VERSION: u64 = 3;

/// Checks the `format` row of a store at `path` (`None`: the row is missing).
pub(crate) fn check_format(found: Option<u64>, path: &Path) -> Result<()> {
    match found {
        Some(FORMAT_VERSION) => Ok(()),
        Some(found) if found > FORMAT_VERSION => Err(StorageError::NewerFormat {
            what: "metadata",
            path: path.to_owned(),
            found,
            supported: FORMAT_VERSION,
        }),
        Some(found) => Err(StorageError::CorruptMetadata {
            path: path.to_owned(),
            reason: format!(
                "format version {found} is a development format older than {FORMAT_VERSION}, the first one a released node wrote; this build does not read it (move the data away and let the node create a new store)"
            ),
        }),
        None => Err(StorageError::CorruptMetadata {
            path: path.to_owned(),
            reason: format!("no format version (expected {FORMAT_VERSION})"),
        }),
    }
}
/// Extent offset that marks a hole masking ancestor data (after a trim).
pub(crate) const ZERO_EXTENT: u64 = u64::MAX;

/// Where a stripe unit of a layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extent {
    /// Reads as zeros, even if an ancestor layer has data.
    Zero,
    /// Stored on `disk` at byte `offset`, one stripe unit long.
    At { disk: u32, offset: u64 },
}

impl Extent {
    pub(crate) fn to_raw(self) -> (u32, u64) {
        match self {
            Extent::Zero => (0, ZERO_EXTENT),
            Extent::At { disk, offset } => (disk, offset),
        }
    }

    pub(crate) fn from_raw((disk, offset): (u32, u64)) -> Self {
        if offset == ZERO_EXTENT {
            Extent::Zero
        } else {
            Extent::At { disk, offset }
        }
    }
}

/// Decoded disk row, before the file is opened.
#[derive(Debug)]
pub(crate) struct DiskRecord {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) capacity: u64,
    pub(crate) high_water: u64,
}

impl DiskRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.str(&self.name);
        e.str(&self.path.to_string_lossy());
        e.u64(self.capacity);
        e.u64(self.high_water);
        e.0
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let mut d = Dec(bytes);
        Some(DiskRecord {
            name: d.str()?,
            path: PathBuf::from(d.str()?),
            capacity: d.u64()?,
            high_water: d.u64()?,
        })
    }
}

/// Stripe geometry shared by a volume, its snapshots and its clones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) size: u64,
    pub(crate) stripe_unit: u64,
    /// Disk id of every stripe column; the stripe width is its length.
    pub(crate) columns: Vec<u32>,
}

impl Geometry {
    fn encode_into(&self, e: &mut Enc) {
        e.u64(self.size);
        e.u64(self.stripe_unit);
        e.u64(self.columns.len() as u64);
        for &c in &self.columns {
            e.u64(u64::from(c));
        }
    }

    fn decode_from(d: &mut Dec<'_>) -> Option<Self> {
        let size = d.u64()?;
        let stripe_unit = d.u64()?;
        let n = d.u64()?;
        let columns = (0..n)
            .map(|_| d.u64().map(|c| c as u32))
            .collect::<Option<Vec<_>>>()?;
        Some(Geometry {
            size,
            stripe_unit,
            columns,
        })
    }
}

/// A writable volume.
#[derive(Debug, Clone)]
pub(crate) struct VolumeRecord {
    pub(crate) geometry: Geometry,
    /// The layer written to; older layers are frozen by snapshots.
    pub(crate) top: u64,
    /// Sequence number of the last write or trim applied (local or replica).
    pub(crate) seq: u64,
}

impl VolumeRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        self.geometry.encode_into(&mut e);
        e.u64(self.top);
        e.u64(self.seq);
        e.0
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let mut d = Dec(bytes);
        Some(VolumeRecord {
            geometry: Geometry::decode_from(&mut d)?,
            top: d.u64()?,
            seq: d.u64()?,
        })
    }
}

/// A read-only snapshot: a frozen layer and the geometry it was taken with.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotRecord {
    pub(crate) geometry: Geometry,
    pub(crate) layer: u64,
    /// Volume sequence number at the time of the snapshot.
    pub(crate) seq: u64,
}

impl SnapshotRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        self.geometry.encode_into(&mut e);
        e.u64(self.layer);
        e.u64(self.seq);
        e.0
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let mut d = Dec(bytes);
        Some(SnapshotRecord {
            geometry: Geometry::decode_from(&mut d)?,
            layer: d.u64()?,
            seq: d.u64()?,
        })
    }
}

/// Little-endian encoder for metadata rows.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
}

/// Decoder matching [`Enc`]; `None` on truncated or malformed input.
struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*head))
    }
    fn str(&mut self) -> Option<String> {
        let len = usize::try_from(self.u64()?).ok()?;
        if self.0.len() < len {
            return None;
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        String::from_utf8(head.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_truncation() {
        let rec = VolumeRecord {
            geometry: Geometry {
                size: 1 << 20,
                stripe_unit: 65536,
                columns: vec![0, 2],
            },
            top: 7,
            seq: 9,
        };
        let bytes = rec.encode();
        let back = VolumeRecord::decode(&bytes).unwrap();
        assert_eq!(back.geometry, rec.geometry);
        assert_eq!((back.top, back.seq), (7, 9));
        assert!(VolumeRecord::decode(&bytes[..bytes.len() - 1]).is_none());
    }

    /// The row encodings are part of [`FORMAT_VERSION`]: changing one without bumping the
    /// version (and reading the previous one) would make an upgraded node misread its store.
    #[test]
    fn row_encodings_are_pinned_by_the_format_version() {
        assert_eq!(
            FORMAT_VERSION, 3,
            "update the pinned encodings below with the format"
        );
        let words =
            |list: &[u64]| -> Vec<u8> { list.iter().flat_map(|w| w.to_le_bytes()).collect() };
        let volume = VolumeRecord {
            geometry: Geometry {
                size: 1 << 20,
                stripe_unit: 65536,
                columns: vec![0, 2],
            },
            top: 7,
            seq: 9,
        };
        assert_eq!(volume.encode(), words(&[1 << 20, 65536, 2, 0, 2, 7, 9]));
        let disk = DiskRecord {
            name: "d0".into(),
            path: PathBuf::from("/x"),
            capacity: 8192,
            high_water: 4096,
        };
        let mut expected = words(&[2]);
        expected.extend(b"d0");
        expected.extend(words(&[2]));
        expected.extend(b"/x");
        expected.extend(words(&[8192, 4096]));
        assert_eq!(disk.encode(), expected);
    }
}
