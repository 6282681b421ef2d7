//! The write journal: one small record per write, stored in a ring at the end of a disk the
//! write touches, so the fdatasync that makes the data durable makes its metadata durable
//! too (one flush per disk instead of one more for the metadata database).
//!
//! redb gets every write immediately but without durability; a durable redb commit (a
//! *checkpoint*, recorded as the journal sequence number it covers) happens before a ring
//! would wrap, every [`CHECKPOINT_RECORDS`] records, on every structural change (trim,
//! snapshot, delete, ...) and on drop. Recovery replays, in sequence order, every record
//! newer than the checkpoint found in any disk's ring, then verifies pending checksums.
//! Replay is idempotent, so it does not matter whether redb kept any non-durable commit.

use crate::crcs::BlockCrc;

/// Bytes of the journal ring at the end of every disk.
pub(crate) const JOURNAL_BYTES: u64 = 4 << 20;
/// Records after which a checkpoint is taken even if no ring is full.
pub(crate) const CHECKPOINT_RECORDS: u64 = 1024;
/// Version of the frame and record encoding below, the last byte of the frame magic
/// (`CAIRNJR1`). It changes only together with the metadata format
/// (`meta::FORMAT_VERSION`), which is checked first; a frame of another version is
/// reported, not skipped, so a record is never silently left out of replay.
pub(crate) const JOURNAL_VERSION: u8 = b'1';
/// The magic without its version byte.
const MAGIC_PREFIX: &[u8; 7] = b"CAIRNJR";
const MAGIC: u64 = u64::from_le_bytes([
    MAGIC_PREFIX[0],
    MAGIC_PREFIX[1],
    MAGIC_PREFIX[2],
    MAGIC_PREFIX[3],
    MAGIC_PREFIX[4],
    MAGIC_PREFIX[5],
    MAGIC_PREFIX[6],
    JOURNAL_VERSION,
]);
const HEADER: usize = 24;

/// The metadata of one write, as journaled and as applied to redb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WriteRecord {
    pub(crate) volume: String,
    /// The encoded volume record after the write.
    pub(crate) volume_record: Vec<u8>,
    /// Layer the new extents belong to.
    pub(crate) layer: u64,
    /// The volume's sequence number before the write (for recovery to roll back to).
    pub(crate) seq_before: u64,
    /// New extents: stripe-unit index, disk, byte offset.
    pub(crate) extents: Vec<(u64, u32, u64)>,
    /// Stripe unit, the size of each new extent.
    pub(crate) extent_size: u64,
    /// Move every pending checksum to the committed table first.
    pub(crate) promote_all: bool,
    /// Acknowledged checksums of overwritten blocks, moved to the committed table.
    pub(crate) olds: Vec<BlockCrc>,
    /// New checksums, pending until known durable.
    pub(crate) updates: Vec<BlockCrc>,
    /// For small overwrites, the data itself (disk, byte offset, bytes): it is durable in
    /// the journal and written in place without waiting; replay writes it again.
    pub(crate) inline: Vec<(u32, u64, Vec<u8>)>,
}

struct Enc(Vec<u8>);

impl Enc {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    /// Checksums as runs of consecutive blocks: disk, first block, count, then a u32 per
    /// block (a 4 MiB write's 1024 checksums take about 4 KiB).
    fn crcs(&mut self, list: &[BlockCrc]) {
        let mut runs: Vec<(u32, u64, Vec<u32>)> = Vec::new();
        for &((disk, block), crc) in list {
            match runs.last_mut() {
                Some((d, first, crcs)) if *d == disk && *first + crcs.len() as u64 == block => {
                    crcs.push(crc)
                }
                _ => runs.push((disk, block, vec![crc])),
            }
        }
        self.u64(runs.len() as u64);
        for (disk, first, crcs) in runs {
            self.u64(u64::from(disk));
            self.u64(first);
            self.u64(crcs.len() as u64);
            for crc in crcs {
                self.0.extend_from_slice(&crc.to_le_bytes());
            }
        }
    }
}

struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*head))
    }
    fn len(&mut self, unit: usize) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n.checked_mul(unit)? <= self.0.len()).then_some(n)
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.len(1)?;
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head.to_vec())
    }
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*head))
    }
    fn crcs(&mut self) -> Option<Vec<BlockCrc>> {
        let runs = self.len(24)?;
        let mut out = Vec::new();
        for _ in 0..runs {
            let disk = self.u64()? as u32;
            let first = self.u64()?;
            let n = self.len(4)?;
            for i in 0..n as u64 {
                out.push(((disk, first + i), self.u32()?));
            }
        }
        Some(out)
    }
}

impl WriteRecord {
    fn encode(&self) -> Vec<u8> {
        let mut e = Enc(Vec::new());
        e.bytes(self.volume.as_bytes());
        e.bytes(&self.volume_record);
        e.u64(self.layer);
        e.u64(self.seq_before);
        e.u64(self.extents.len() as u64);
        for &(stripe, disk, offset) in &self.extents {
            e.u64(stripe);
            e.u64(u64::from(disk));
            e.u64(offset);
        }
        e.u64(self.extent_size);
        e.u64(u64::from(self.promote_all));
        e.crcs(&self.olds);
        e.crcs(&self.updates);
        e.u64(self.inline.len() as u64);
        for (disk, offset, bytes) in &self.inline {
            e.u64(u64::from(*disk));
            e.u64(*offset);
            e.bytes(bytes);
        }
        e.0
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let mut d = Dec(bytes);
        let volume = String::from_utf8(d.bytes()?).ok()?;
        let volume_record = d.bytes()?;
        let layer = d.u64()?;
        let seq_before = d.u64()?;
        let n = d.len(24)?;
        let extents = (0..n)
            .map(|_| Some((d.u64()?, d.u64()? as u32, d.u64()?)))
            .collect::<Option<Vec<_>>>()?;
        let extent_size = d.u64()?;
        let promote_all = d.u64()? != 0;
        let olds = d.crcs()?;
        let updates = d.crcs()?;
        let n = d.len(24)?;
        let inline = (0..n)
            .map(|_| Some((d.u64()? as u32, d.u64()?, d.bytes()?)))
            .collect::<Option<Vec<_>>>()?;
        Some(WriteRecord {
            volume,
            volume_record,
            layer,
            seq_before,
            extents,
            extent_size,
            promote_all,
            olds,
            updates,
            inline,
        })
    }

    /// The framed record, padded to whole blocks: magic, sequence number, payload length
    /// and crc32c, payload.
    pub(crate) fn frame(&self, seq: u64) -> Vec<u8> {
        let payload = self.encode();
        let mut out = Vec::with_capacity(HEADER + payload.len() + 4096);
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out.resize(out.len().div_ceil(4096) * 4096, 0);
        out
    }
}

/// A journal frame of another version than [`JOURNAL_VERSION`] (the version byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OtherVersion(pub(crate) u8);

impl OtherVersion {
    /// The version as a number (`b'2'` is 2), for messages.
    pub(crate) fn number(self) -> u64 {
        u64::from(self.0.wrapping_sub(b'0'))
    }
}

/// Every intact record in a ring, with its sequence number, in ring order. Parsing stops at
/// the first block that does not start an intact record; a frame of another journal
/// version is an error (its records cannot be replayed by this build).
pub(crate) fn parse_ring(ring: &[u8]) -> Result<Vec<(u64, WriteRecord)>, OtherVersion> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + HEADER <= ring.len() {
        let header = &ring[pos..pos + HEADER];
        let field = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        if field(0) != MAGIC {
            if header[..7] == MAGIC_PREFIX[..] && header[7].is_ascii_digit() {
                return Err(OtherVersion(header[7]));
            }
            break;
        }
        let seq = field(8);
        let len = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[20..24].try_into().expect("4 bytes"));
        let Some(payload) = ring.get(pos + HEADER..pos + HEADER + len) else {
            break;
        };
        if crc32c::crc32c(payload) != crc {
            break;
        }
        let Some(record) = WriteRecord::decode(payload) else {
            break;
        };
        out.push((seq, record));
        pos += (HEADER + len).div_ceil(4096) * 4096;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> WriteRecord {
        WriteRecord {
            volume: format!("v{n}"),
            volume_record: vec![1, 2, 3],
            layer: 4,
            seq_before: n,
            extents: vec![(n, 1, 4096 * n)],
            extent_size: 65536,
            promote_all: n.is_multiple_of(2),
            olds: vec![((0, 7), 9)],
            updates: (0..100).map(|b| ((1, b), b as u32)).collect(),
            inline: vec![(2, 8192, vec![n as u8; 4096])],
        }
    }

    #[test]
    fn records_round_trip_and_parsing_stops_at_damage() {
        let mut ring = Vec::new();
        for n in 1..=3 {
            ring.extend(record(n).frame(10 + n));
        }
        let intact = ring.len();
        ring.resize(intact + 8192, 0xee);
        let parsed = parse_ring(&ring).unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[2], (13, record(3)));
        // A flipped byte in the second record ends parsing before it.
        let second = record(1).frame(11).len() + 40;
        ring[second] ^= 1;
        assert_eq!(parse_ring(&ring).unwrap().len(), 1);
    }

    #[test]
    fn frames_carry_their_version_and_another_version_is_reported() {
        let frame = record(1).frame(1);
        assert_eq!(&frame[..8], b"CAIRNJR1");
        let mut ring = frame.clone();
        ring.extend(record(2).frame(2));
        // A frame written by a newer journal format after an intact one.
        let at = frame.len();
        ring[at + 7] = b'2';
        let error = parse_ring(&ring).unwrap_err();
        assert_eq!(error, OtherVersion(b'2'));
        assert_eq!(error.number(), 2);
        // Anything else is the end of the ring, as before.
        ring[at..at + 8].copy_from_slice(b"NOTAJRNL");
        assert_eq!(parse_ring(&ring).unwrap().len(), 1);
    }
}
