//! `cairn-node --enroll TOKEN --controller ADDR`: a new node comes to trust the
//! controller by a one-time token instead of a copied key file (issue 24, item 7;
//! `proto::enroll`, the controller's `controller::enroll`).
//!
//! Before the node serves, it sends `Enrollment.Enroll` (its name, its public key,
//! the token, signed with its key) to the controller's gRPC listener (each address of
//! a comma-separated list in turn while they are unreachable; a refusal is final). The
//! reply's keys are accepted only with the token's MAC and written to
//! `DATA_DIR/trusted-controllers`, the file the node's trust is read from. A node that
//! already trusts a controller key there skips the call, so the same command line
//! restarts an enrolled node; a node whose token is refused does not start (exit 2,
//! the controller's reason).

use std::path::Path;
use std::time::Duration;

use proto::auth::{Identity, TrustedKeys};
use proto::v1;

use crate::node::files;
use crate::trust::DEV_CONTROLLERS_FILE;

/// What [`enroll`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolled {
    /// The node was enrolled now; it trusts these many keys.
    Now(usize),
    /// It was enrolled before (its trusted-controllers file has keys).
    Before(usize),
}

/// Enrolls node `name` in `data_dir` with `token` at `controller` (one address or a
/// comma-separated list). `Err` is the reason, ready to print.
pub async fn enroll(
    data_dir: &Path,
    name: &str,
    token: &str,
    controller: &str,
) -> Result<Enrolled, String> {
    let trusted = data_dir.join(DEV_CONTROLLERS_FILE);
    if trusted.exists() {
        let keys = TrustedKeys::load(&trusted).map_err(|e| e.to_string())?;
        if !keys.is_empty() {
            return Ok(Enrolled::Before(keys.len()));
        }
    }
    proto::enroll::check_token(token)?;
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let identity = Identity::load_or_create(
        &data_dir.join(files::IDENTITY_KEY),
        &data_dir.join(files::IDENTITY_PUB),
    )
    .map_err(|e| e.to_string())?;
    let addresses: Vec<&str> = controller
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    if addresses.is_empty() {
        return Err("--controller names no address".into());
    }
    // A controller that is starting or busy (its state store held by a sync) may
    // answer late: the list is tried again until this deadline. A retry after a lost
    // answer is answered again (the token is used by this very key).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut unreachable = Vec::new();
    for address in addresses.iter().cycle() {
        if std::time::Instant::now() >= deadline {
            break;
        }
        let request = proto::enroll::request(&identity, name, token, crate::events::now_unix_ms());
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("--controller {address}: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .connect_lazy();
        let mut client = v1::enrollment_client::EnrollmentClient::new(channel);
        let reply = match client.enroll(request).await {
            Ok(reply) => reply.into_inner(),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                ) =>
            {
                unreachable.push(format!("{address}: {}", status.message()));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(status) => {
                return Err(format!(
                    "the controller at {address} refused the enrollment of node {name}: {}",
                    status.message()
                ));
            }
        };
        let text = proto::enroll::accept_reply(token, &reply)
            .map_err(|why| format!("the answer of {address}: {why}"))?;
        crate::trust::write_atomically(&trusted, &text)?;
        return Ok(Enrolled::Now(reply.controller_keys.len()));
    }
    unreachable.dedup();
    let unreachable = unreachable.split_off(unreachable.len().saturating_sub(3));
    Err(format!(
        "no controller answered the enrollment within 60 s: {}",
        unreachable.join("; ")
    ))
}
