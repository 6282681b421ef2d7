//! Images with disk content (issue 15 item 5): the base volumes `from-image` disks are
//! cloned from.
//!
//! An image's disk file is imported once into a base volume, which is snapshotted
//! ([`BASE_SNAPSHOT`]); each `from-image=#true` disk is a copy-on-write clone of that
//! snapshot (`CloneVolume`), grown to the disk's size. A clone's copies live where its
//! source's copies live (the node API's rule), so there is one base per image and per
//! set of copies (primary first, then replicas): [`base_name`]. Two VMs whose disks'
//! copies land on the same nodes share one base and one import.
//!
//! The planner sizes the base from the file itself ([`inspect`]: the qcow2 header's
//! virtual size, a raw file's length), before anything is sent; a file that cannot be
//! read or is not what its `format` says refuses the plan, naming the file and where
//! the spec names it. The node checks it again with `qemu-img info` before it writes.
//!
//! A base holds one *version* of the file: its content's SHA-256 ([`file_version`]) is
//! part of the base's name. When the file changes, the next plan names a new base, which
//! is imported beside the old one: disks made before keep the blocks of the version
//! they were cloned from (their layer chain holds them, whatever becomes of the old
//! base), and new `from-image` disks are clones of the new version. The hash is
//! computed once per file state: it is remembered by device, inode, size and
//! modification time, so a plan reads the file again only when one of those moved, and
//! a file touched without a change in its bytes (a fresh checkout) keeps its base.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The snapshot of a base volume that clones are made from.
pub const BASE_SNAPSHOT: &str = "image";

/// The prefix of every base volume's name.
pub const BASE_PREFIX: &str = "image-";

/// The base volume an image's disk file is imported into, for one set of copies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageBase {
    /// The base volume's name ([`base_name`]).
    pub name: String,
    /// The image.
    pub image: String,
    /// The disk file, absolute.
    pub path: String,
    /// `raw` or `qcow2`.
    pub format: String,
    /// Where the spec names the file (`FILE:LINE:COL`; empty when unknown).
    pub at: String,
    /// The base's size: the file's virtual size rounded up to 4 KiB; `Err` says why
    /// the file cannot be imported.
    pub size: Result<u64, String>,
    /// The file's version this base holds: the SHA-256 of its bytes, hex (empty when
    /// the file cannot be read).
    #[serde(default)]
    pub version: String,
}

impl ImageBase {
    /// `file /abs/path (named at FILE:LINE:COL)`.
    pub fn file_text(&self) -> String {
        if self.at.is_empty() {
            format!("disk file {}", self.path)
        } else {
            format!("disk file {} (named at {})", self.path, self.at)
        }
    }
}

/// The base volume of `image` whose copies live on `primary` and `replicas` (in that
/// order: the clone's primary is the base's primary), for the file `path` at `version`
/// (its content's hash, [`file_version`]): a DNS label of at most 63 characters,
/// `image-NAME-HASH`.
pub fn base_name(
    image: &str,
    path: &str,
    version: &str,
    primary: &str,
    replicas: &[String],
) -> String {
    let mut hasher = Sha256::new();
    for part in [path, version, primary]
        .into_iter()
        .chain(replicas.iter().map(String::as_str))
    {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let hash = proto::auth::to_hex(&hasher.finalize()[..5]);
    let mut image: String = image
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63 - BASE_PREFIX.len() - 1 - hash.len())
        .collect();
    while image.ends_with('-') {
        image.pop();
    }
    format!("{BASE_PREFIX}{image}-{hash}")
}

/// Whether `volume` is a base volume (by its name).
pub fn is_base(volume: &str) -> bool {
    volume.starts_with(BASE_PREFIX)
}

/// The sanitized image part of a base's name (`image-NAME`), without the hash.
fn image_part(image: &str) -> String {
    let probe = base_name(image, "", "", "", &[]);
    probe
        .rsplit_once('-')
        .map(|(head, _)| head.to_owned())
        .unwrap_or(probe)
}

/// `image-NAME` of the base volume `volume` (its name without the hash), if it is one.
pub fn base_image(volume: &str) -> Option<&str> {
    is_base(volume)
        .then(|| volume.rsplit_once('-').map(|(head, _)| head))
        .flatten()
}

/// `image-NAME` of every image of the model with a disk file: their bases are kept.
pub fn kept_bases(model: &compiler::Model) -> std::collections::BTreeSet<String> {
    model
        .images
        .iter()
        .filter(|i| i.disk.is_some())
        .map(|i| image_part(&i.name))
        .collect()
}

/// The base a `from-image` disk placed as `vp` is cloned from, when its image has a
/// disk file (none: the disk starts empty, as for the built-in guest).
pub fn desired_base(
    image: &compiler::model::Image,
    spec_root: &Path,
    vp: &compiler::place::VolumePlacement,
) -> Option<ImageBase> {
    let disk = image.disk.as_ref()?;
    let path = spec_root.join(&disk.path).display().to_string();
    let format = disk.format.as_str().to_owned();
    let (size, version) = match inspect(Path::new(&path), &format)
        .and_then(|size| Ok((round_up(size), file_version(Path::new(&path))?)))
    {
        Ok((size, version)) => (Ok(size), version),
        Err(why) => (Err(why), String::new()),
    };
    Some(ImageBase {
        name: base_name(&image.name, &path, &version, &vp.primary, &vp.replicas),
        image: image.name.clone(),
        size,
        version,
        path,
        format,
        at: disk.at.clone(),
    })
}

/// What a file's hash is remembered by: device, inode, size, modification time (ns).
type FileState = (u64, u64, u64, i64, i64);

/// Hashes computed so far, by path and [`FileState`].
static VERSIONS: Mutex<Option<HashMap<PathBuf, (FileState, String)>>> = Mutex::new(None);

/// The version of the disk file `path`: the SHA-256 of its bytes, hex. Computed again
/// only when the file's device, inode, size or modification time moved since the last
/// call in this process; a file that changes while it is read (its state differs
/// before and after) is read again, up to three times.
pub fn file_version(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let state = |meta: &std::fs::Metadata| -> FileState {
        (
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
        )
    };
    let unreadable = |e: std::io::Error| format!("it cannot be read: {e}");
    let before = state(&std::fs::metadata(path).map_err(unreadable)?);
    if let Some((seen, hash)) = VERSIONS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|m| m.get(path))
        && *seen == before
    {
        return Ok(hash.clone());
    }
    let mut before = before;
    for _ in 0..3 {
        let mut file = std::fs::File::open(path).map_err(unreadable)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer).map_err(unreadable)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        let after = state(&file.metadata().map_err(unreadable)?);
        if after == before {
            let hash = proto::auth::to_hex(&hasher.finalize());
            VERSIONS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(HashMap::new)
                .insert(path.to_owned(), (after, hash.clone()));
            return Ok(hash);
        }
        before = after;
    }
    Err("it kept changing while it was read (three tries): import it once it is written".to_owned())
}

const QCOW2_MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];

/// The virtual size of the disk file `path` read as `format` (`raw`: its length;
/// `qcow2`: the header's size field, after checking its magic and version), or why it
/// cannot be imported.
pub fn inspect(path: &Path, format: &str) -> Result<u64, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("it cannot be read: {e}"))?;
    let len = file
        .metadata()
        .map_err(|e| format!("it cannot be read: {e}"))?
        .len();
    match format {
        "raw" => {
            if len == 0 {
                return Err("it is empty: a raw disk file holds the disk's bytes".to_owned());
            }
            Ok(len)
        }
        "qcow2" => {
            let mut header = [0u8; 32];
            file.read_exact(&mut header).map_err(|_| {
                format!("it is not a qcow2 file: {len} bytes, shorter than a qcow2 header")
            })?;
            if header[..4] != QCOW2_MAGIC {
                let hint = if header[..4] == [0; 4] || len % 512 == 0 {
                    " (if it holds raw disk bytes, say `format=\"raw\"`)"
                } else {
                    ""
                };
                return Err(format!(
                    "it is not a qcow2 file: it does not start with the qcow2 magic `QFI\\xfb`{hint}"
                ));
            }
            let version = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
            if !(2..=3).contains(&version) {
                return Err(format!(
                    "its qcow2 header says version {version}; qemu-img writes versions 2 and 3"
                ));
            }
            let size = u64::from_be_bytes(header[24..32].try_into().expect("8 bytes"));
            if size == 0 {
                return Err("its qcow2 header says the disk holds 0 bytes".to_owned());
            }
            Ok(size)
        }
        other => Err(format!("`{other}` is not a disk file format (raw, qcow2)")),
    }
}

/// `size` rounded up to a whole 4 KiB block (a volume's size is a multiple of 4096).
pub fn round_up(size: u64) -> u64 {
    size.div_ceil(4096) * 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_names_are_dns_labels_per_image_file_and_copies() {
        let r = vec!["lab-2".to_owned()];
        let a = base_name("Debian_12", "/s/images/d.qcow2", "v1", "lab-1", &r);
        assert!(a.starts_with("image-debian-12-"), "{a}");
        assert!(a.len() <= 63);
        assert_eq!(
            a,
            base_name("Debian_12", "/s/images/d.qcow2", "v1", "lab-1", &r)
        );
        assert_ne!(
            a,
            base_name("Debian_12", "/s/images/d.qcow2", "v1", "lab-2", &r)
        );
        assert_ne!(
            a,
            base_name("Debian_12", "/s/images/e.qcow2", "v1", "lab-1", &r)
        );
        // Another version of the file: another base.
        assert_ne!(
            a,
            base_name("Debian_12", "/s/images/d.qcow2", "v2", "lab-1", &r)
        );
        let long = base_name(&"x".repeat(80), "/p", "", "n", &[]);
        assert!(long.len() <= 63, "{long}");
        assert!(is_base(&long) && !is_base("db-data"));
        assert_eq!(base_image(&a), Some("image-debian-12"));
        assert_eq!(image_part("Debian_12"), "image-debian-12");
        assert_eq!(base_image("db-data"), None);
    }

    #[test]
    fn inspect_reads_qcow2_headers_and_refuses_what_is_not_one() {
        let dir = std::env::temp_dir().join(format!("cairn-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let q = dir.join("d.qcow2");
        let mut header = vec![0u8; 512];
        header[..4].copy_from_slice(&QCOW2_MAGIC);
        header[4..8].copy_from_slice(&3u32.to_be_bytes());
        header[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes());
        std::fs::write(&q, &header).unwrap();
        assert_eq!(inspect(&q, "qcow2"), Ok(64 << 20));
        assert_eq!(inspect(&q, "raw"), Ok(512));
        let r = dir.join("r.img");
        std::fs::write(&r, vec![7u8; 4096]).unwrap();
        let e = inspect(&r, "qcow2").unwrap_err();
        assert!(
            e.contains("not a qcow2 file") && e.contains("format=\"raw\""),
            "{e}"
        );
        std::fs::write(&r, b"QFI").unwrap();
        assert!(
            inspect(&r, "qcow2")
                .unwrap_err()
                .contains("shorter than a qcow2 header")
        );
        header[4..8].copy_from_slice(&9u32.to_be_bytes());
        std::fs::write(&q, &header).unwrap();
        assert!(inspect(&q, "qcow2").unwrap_err().contains("version 9"));
        let e = inspect(&dir.join("missing.qcow2"), "qcow2").unwrap_err();
        assert!(e.contains("cannot be read"), "{e}");
        std::fs::write(&r, b"").unwrap();
        assert!(inspect(&r, "raw").unwrap_err().contains("empty"));
        assert_eq!(round_up(1), 4096);
        assert_eq!(round_up(8192), 8192);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_files_version_is_its_content_hash_and_follows_every_change() {
        let dir = std::env::temp_dir().join(format!("cairn-versions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("d.raw");
        std::fs::write(&f, vec![1u8; 8192]).unwrap();
        let one = file_version(&f).unwrap();
        assert_eq!(one.len(), 64);
        assert_eq!(file_version(&f).unwrap(), one, "remembered");
        // Same size, other bytes: another version (the modification time moved).
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, vec![2u8; 8192]).unwrap();
        let two = file_version(&f).unwrap();
        assert_ne!(two, one);
        // The same bytes written again (a fresh checkout): the same version.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, vec![2u8; 8192]).unwrap();
        assert_eq!(file_version(&f).unwrap(), two);
        // Replaced by another file (another inode) of the first bytes.
        let g = dir.join("g.raw");
        std::fs::write(&g, vec![1u8; 8192]).unwrap();
        std::fs::rename(&g, &f).unwrap();
        assert_eq!(file_version(&f).unwrap(), one);
        let e = file_version(&dir.join("missing")).unwrap_err();
        assert!(e.contains("cannot be read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
