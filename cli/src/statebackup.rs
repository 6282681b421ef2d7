//! `cairn controller backup|restore`: the control plane's state in etcd, written to
//! a file and restored into a new etcd or prefix (`state_etcd::backup`).

use std::io::Write as _;
use std::path::Path;

/// `cairn controller backup --state etcd://HOSTS/PREFIX --out FILE`.
pub fn backup(state: &str, out: &Path) -> anyhow::Result<u8> {
    let Some(url) = etcd_url(state) else {
        return Ok(2);
    };
    // Written beside the target and renamed when whole: a failed backup leaves no
    // file that looks like one.
    let partial = out.with_file_name(format!(
        ".{}.partial-{}",
        out.file_name()
            .map_or("backup".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let written = (|| -> anyhow::Result<state_etcd::backup::Summary> {
        let file = std::fs::File::create(&partial)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", partial.display()))?;
        let mut writer = std::io::BufWriter::new(&file);
        let summary = state_etcd::backup::backup(url, &mut writer)?;
        writer.flush()?;
        drop(writer);
        file.sync_all()?;
        std::fs::rename(&partial, out)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
        Ok(summary)
    })();
    let summary = match written {
        Ok(summary) => summary,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            eprintln!("error: {error:#}");
            return Ok(1);
        }
    };
    println!(
        "backed up {} keys ({} bytes of values) of {url} at revision {} to {} (sha256 {})",
        summary.keys,
        summary.bytes,
        summary.revision,
        out.display(),
        summary.sha256
    );
    Ok(0)
}

/// `cairn controller restore --state etcd://HOSTS/PREFIX FILE`.
pub fn restore(state: &str, file: &Path) -> anyhow::Result<u8> {
    let Some(url) = etcd_url(state) else {
        return Ok(2);
    };
    let input = std::fs::File::open(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let summary = match state_etcd::backup::restore(
        url,
        &file.display().to_string(),
        &mut std::io::BufReader::new(input),
    ) {
        Ok(summary) => summary,
        Err(error) => {
            eprintln!("error: {error}");
            return Ok(1);
        }
    };
    println!(
        "restored {} keys ({} bytes of values) into {url}, as they were at revision {} of the backed-up etcd; fencing tokens of its controllers now start above {} (nodes accept them)",
        summary.keys, summary.bytes, summary.revision, summary.token_base
    );
    Ok(0)
}

fn etcd_url(state: &str) -> Option<&str> {
    if state.starts_with("etcd://") {
        return Some(state);
    }
    eprintln!(
        "error: --state {state}: backup and restore read and write an etcd store (etcd://HOST:PORT[,…]/PREFIX); a state.redb file is backed up by stopping its controller and copying the file"
    );
    None
}
