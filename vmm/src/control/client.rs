//! The agent's side of the control socket: [`ControlClient`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::wire::{Request, Response, VmIdentity, VmStatus};

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, sending or receiving failed.
    #[error("control socket i/o failed")]
    Io(#[from] io::Error),
    /// The VMM answered something that is not a response.
    #[error("malformed response from the VMM: {0}")]
    Malformed(String),
    /// The VMM closed the connection (it is exiting).
    #[error("the VMM closed the control connection")]
    Closed,
    /// The VMM refused the request.
    #[error("the VMM refused the request: {0}")]
    Refused(String),
}

/// A client of the control socket (for the node agent and tests).
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to the socket at `path`, with `timeout` for each read and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends `request` and returns the raw response.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let mut text = serde_json::to_string(request).expect("requests serialize");
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&line)
            .map_err(|error| ClientError::Malformed(format!("{error}: {line}")))
    }

    /// Sends `request`; a refusal becomes [`ClientError::Refused`].
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        let response = self.call(request)?;
        if !response.ok {
            return Err(ClientError::Refused(response.error.unwrap_or_default()));
        }
        Ok(response)
    }

    /// Runs a disk I/O command in the built-in guest and returns its report. The
    /// connection's read timeout must exceed the command's `timeout_ms`.
    pub fn guest_disk_io(
        &mut self,
        request: super::wire::GuestDiskIoRequest,
    ) -> Result<super::wire::GuestDiskIoResult, ClientError> {
        self.request(&Request::GuestDiskIo(request))?
            .guest_disk_io
            .ok_or_else(|| ClientError::Malformed("guest-disk-io without its result".into()))
    }

    /// The VM's status.
    pub fn status(&mut self) -> Result<VmStatus, ClientError> {
        self.request(&Request::Status)?
            .status
            .ok_or_else(|| ClientError::Malformed("status without status".into()))
    }

    /// Who the VMM is: its VM's name, its incarnation id and its pid.
    pub fn identify(&mut self) -> Result<VmIdentity, ClientError> {
        self.request(&Request::Identify)?
            .identity
            .ok_or_else(|| ClientError::Malformed("identify without identity".into()))
    }
}
