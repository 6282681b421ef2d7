//! `Apply.ImportImage`: an image's disk file written into the base volume that
//! `from-image` disks are cloned from (issue 15 item 5).
//!
//! The node is the volume's writer. It asks `qemu-img info` for the file's virtual
//! size (a file qemu-img cannot read, or one larger than the volume, is refused before
//! anything is written), exports the volume on a private NBD socket (the same
//! [`Exports`] a `cairn volume export` gets: every write goes through
//! [`Volumes::write`](crate::volumes::Volumes::write), so it is on every copy before
//! qemu-img hears it is done), runs `qemu-img convert -n --target-is-zero -f FORMAT -O
//! raw FILE URI`, and closes the export. `--target-is-zero` skips the file's zero
//! areas: the base was created empty, and a retry after a partial import only ever
//! wrote the file's own bytes at their own offsets, so the zero areas are still zero.
//! The controller then snapshots the base (`SnapshotVolume`) and clones it.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use proto::v1;
use tonic::Status;

use crate::exports::Exports;
use crate::volumes::Volumes;

/// How long one import may take (qemu-img convert of the whole file).
pub const IMPORT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The file's virtual size.
    pub virtual_size_bytes: u64,
    /// How long qemu-img convert took.
    pub elapsed: Duration,
}

/// `where the spec names it` for messages: " (FILE:LINE:COL)" or nothing.
fn at(source: &str) -> String {
    if source.is_empty() {
        String::new()
    } else {
        format!(" (named at {source})")
    }
}

fn qemu_img_words(output: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr);
    let text = text.trim();
    if text.is_empty() {
        format!("qemu-img exited with {}", output.status)
    } else {
        text.replace('\n', "; ")
    }
}

/// The virtual size of `path` read as `format` (`qemu-img info`).
pub async fn virtual_size(path: &str, format: &str, source: &str) -> Result<u64, Status> {
    let output = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", format, path])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|error| {
            Status::failed_precondition(format!(
                "qemu-img cannot be run on this node to import image disk file {path}{}: {error}; install qemu-utils",
                at(source)
            ))
        })?;
    if !output.status.success() {
        return Err(Status::failed_precondition(format!(
            "image disk file {path}{} cannot be read as {format}: {}",
            at(source),
            qemu_img_words(&output)
        )));
    }
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|error| {
        Status::internal(format!("qemu-img info of {path} is not JSON: {error}"))
    })?;
    info["virtual-size"]
        .as_u64()
        .ok_or_else(|| Status::internal(format!("qemu-img info of {path} has no virtual-size")))
}

fn check(import: &v1::ImportImage) -> Result<(), Status> {
    crate::validate::name("import_image.volume", &import.volume)?;
    if !matches!(import.format.as_str(), "raw" | "qcow2") {
        return Err(crate::validate::invalid(
            "import_image.format",
            format!("`{}` is not `raw` or `qcow2`", import.format),
        ));
    }
    if !Path::new(&import.path).is_absolute() {
        return Err(crate::validate::invalid(
            "import_image.path",
            format!("`{}` is not an absolute path", import.path),
        ));
    }
    Ok(())
}

/// Carries out `ImportImage` on this node (see the module docs).
pub async fn import(
    volumes: &Volumes,
    exports: &Exports,
    import: &v1::ImportImage,
) -> Result<Imported, Status> {
    check(import)?;
    let (writer, size) = volumes.role_and_size(&import.volume).await?;
    if !writer {
        return Err(Status::failed_precondition(format!(
            "this node does not write volume `{}`; send ImportImage to its writer",
            import.volume
        )));
    }
    let source = import.source.as_str();
    if std::fs::File::open(&import.path).is_err() {
        let error = std::fs::File::open(&import.path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        return Err(Status::failed_precondition(format!(
            "image disk file {}{} cannot be read on this node: {error}",
            import.path,
            at(source)
        )));
    }
    let virtual_size = virtual_size(&import.path, &import.format, source).await?;
    if virtual_size > size {
        return Err(Status::failed_precondition(format!(
            "image disk file {}{} holds {virtual_size} bytes, more than volume `{}` ({size} bytes)",
            import.path,
            at(source),
            import.volume
        )));
    }
    let export = exports
        .export(&import.volume, Some(IMPORT_TIMEOUT), false)
        .await?;
    let started = Instant::now();
    let converted = tokio::time::timeout(
        IMPORT_TIMEOUT,
        tokio::process::Command::new("qemu-img")
            .args(["convert", "-n", "--target-is-zero", "-f"])
            .arg(&import.format)
            .args(["-O", "raw"])
            .arg(&import.path)
            .arg(&export.uri)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let elapsed = started.elapsed();
    let closed = exports.unexport(&import.volume).await;
    let output = match converted {
        Err(_) => {
            return Err(Status::deadline_exceeded(format!(
                "importing image disk file {}{} into volume `{}` took more than {:?}",
                import.path,
                at(source),
                import.volume,
                IMPORT_TIMEOUT
            )));
        }
        Ok(Err(error)) => {
            return Err(Status::failed_precondition(format!(
                "qemu-img cannot be run on this node to import {}: {error}",
                import.path
            )));
        }
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        return Err(Status::failed_precondition(format!(
            "image disk file {}{} could not be imported into volume `{}`: {}",
            import.path,
            at(source),
            import.volume,
            qemu_img_words(&output)
        )));
    }
    closed?;
    Ok(Imported {
        virtual_size_bytes: virtual_size,
        elapsed,
    })
}
