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
    // A controller that is starting or busy (its state store held by a sync) may
    // answer late: the list is tried again for 60 s. A retry after a lost answer is
    // answered again (the token is used by this very key).
    let (address, reply) = ask_controllers(controller, |mut client| {
        let request = proto::enroll::request(&identity, name, token, crate::events::now_unix_ms());
        async move { client.enroll(request).await }
    })
    .await
    .map_err(|asked| asked.describe("enrollment", name))?;
    let text = proto::enroll::accept_reply(token, &reply)
        .map_err(|why| format!("the answer of {address}: {why}"))?;
    crate::trust::write_atomically(&trusted, &text)?;
    Ok(Enrolled::Now(reply.controller_keys.len()))
}

/// Why [`ask_controllers`] got no answer.
#[derive(Debug)]
enum Asked {
    /// `--controller` is not a usable address list.
    Address(String),
    /// A controller answered with a refusal: final.
    Refused(String, tonic::Status),
    /// None answered within 60 s: the last reasons.
    Unreachable(Vec<String>),
}

impl Asked {
    /// The error of the `what` of node `name`, ready to print.
    fn describe(self, what: &str, name: &str) -> String {
        match self {
            Asked::Address(problem) => problem,
            Asked::Refused(address, status) => format!(
                "the controller at {address} refused the {what} of node {name}: {}",
                status.message()
            ),
            Asked::Unreachable(mut reasons) => {
                reasons.dedup();
                let reasons = reasons.split_off(reasons.len().saturating_sub(3));
                format!(
                    "no controller answered the {what} within 60 s: {}",
                    reasons.join("; ")
                )
            }
        }
    }
}

/// Calls `call` with an `Enrollment` client of each address of `controller` (one
/// address or a comma-separated list) in turn, until one answers; unreachable, slow
/// and cancelled calls are tried again, on the next address, for 60 s. The address
/// that answered and its reply.
async fn ask_controllers<T, F, Fut>(controller: &str, mut call: F) -> Result<(String, T), Asked>
where
    F: FnMut(v1::enrollment_client::EnrollmentClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let addresses: Vec<&str> = controller
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    if addresses.is_empty() {
        return Err(Asked::Address("--controller names no address".into()));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut unreachable = Vec::new();
    for address in addresses.iter().cycle() {
        if std::time::Instant::now() >= deadline {
            break;
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| Asked::Address(format!("--controller {address}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .connect_lazy();
        match call(v1::enrollment_client::EnrollmentClient::new(channel)).await {
            Ok(reply) => return Ok(((*address).to_owned(), reply.into_inner())),
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
            }
            Err(status) => return Err(Asked::Refused((*address).to_owned(), status)),
        }
    }
    Err(Asked::Unreachable(unreachable))
}

/// The next key's secret while a node key rotation is not confirmed by the
/// controller (a crash or a lost answer asks again with the same key).
pub const NEXT_KEY: &str = "identity.key.next";
/// The key rotated out, kept for the operator after a rotation.
pub const OLD_KEY: &str = "identity.key.old";

/// `cairn-node --rotate-key`: before the node serves, it asks the controller
/// (`Enrollment.RotateNodeKey`, signed by its pinned key and by a new one) to pin a new
/// key, then writes it as `identity.key` (the old one kept as `identity.key.old`). The
/// new key waits in `identity.key.next` until the controller confirms, so a run cut
/// off asks again with the same key. Run it as an agent restart: the VMs keep running
/// and are adopted, and the node signs with the new key from its first request.
/// Returns the new key, hex.
pub async fn rotate_key(data_dir: &Path, name: &str, controller: &str) -> Result<String, String> {
    let key_path = data_dir.join(files::IDENTITY_KEY);
    let next_path = data_dir.join(NEXT_KEY);
    let old = Identity::load(&key_path).map_err(|e| format!("the node's key: {e}"))?;
    let new = match Identity::load(&next_path) {
        Ok(next) => next,
        Err(_) => {
            let next = Identity::generate().map_err(|e| e.to_string())?;
            proto::auth::write_file_atomically(
                &next_path,
                &format!("{}\n", next.secret_seed_hex()),
                0o600,
            )
            .map_err(|e| e.to_string())?;
            next
        }
    };
    let (address, reply) = ask_controllers(controller, |mut client| {
        let request =
            proto::enroll::rotation_request(&old, &new, name, crate::events::now_unix_ms());
        async move { client.rotate_node_key(request).await }
    })
    .await
    .map_err(|asked| {
        format!(
            "{}; the new key waits in {}",
            asked.describe("key rotation", name),
            next_path.display()
        )
    })?;
    if reply.public_key_hex != new.public_key_hex() {
        return Err(format!(
            "the controller at {address} pinned {}… for node {name}, not the new key",
            &reply.public_key_hex
        ));
    }
    let write = |path: &Path, text: String, mode| {
        proto::auth::write_file_atomically(path, &text, mode).map_err(|e| e.to_string())
    };
    write(
        &data_dir.join(OLD_KEY),
        format!("{}\n", old.secret_seed_hex()),
        0o600,
    )?;
    write(&key_path, format!("{}\n", new.secret_seed_hex()), 0o600)?;
    write(
        &data_dir.join(files::IDENTITY_PUB),
        format!("{}\n", new.public_key_hex()),
        0o644,
    )?;
    let _ = std::fs::remove_file(&next_path);
    Ok(new.public_key_hex())
}
