//! The client side of the quorum witness (`cairn witness`, `witness.proto`): a node
//! that lost its controller and the controller deciding whether a node failed both
//! claim the node's grant through a [`WitnessClient`].
//!
//! The client knows only the witness's address; it learns the witness's name and key
//! from the refusal of an unsigned request (as a client of a node does, see
//! [`crate::auth::identity_probe`]) and signs every later call for them. A refusal
//! for naming another identity (the witness's key changed) makes it ask again once.

use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::auth::{NodeTarget, RequestSigner};
use crate::methods;
use crate::v1;
use crate::v1::witness_client::WitnessClient as Raw;

/// The name every witness answers as (`x-cairn-target-node`).
pub const NAME: &str = "witness";

/// The claimant name of a controller.
pub const CONTROLLER: &str = "controller";

/// The HA key of node `name`: held by the node to keep its HA VMs, by the controller
/// to restart them elsewhere.
pub fn node_key(name: &str) -> String {
    format!("node/{name}")
}

/// The FT key of VM `name` (issue 22): held by the pair's running side.
pub fn vm_key(name: &str) -> String {
    format!("vm/{name}")
}

/// A signed client of one witness address.
#[derive(Debug)]
pub struct WitnessClient {
    address: String,
    channel: Channel,
    signer: RequestSigner,
    target: Mutex<Option<NodeTarget>>,
}

impl WitnessClient {
    /// A client of the witness at `address` (`host:port`); each call is bounded by
    /// `timeout` and leaves from `local_address` when given. Connects lazily.
    pub fn new(
        address: &str,
        signer: RequestSigner,
        timeout: Duration,
        local_address: Option<std::net::IpAddr>,
    ) -> Result<WitnessClient, String> {
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("the witness address `{address}`: {e}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .local_address(local_address)
            .connect_lazy();
        Ok(WitnessClient {
            address: address.to_owned(),
            channel,
            signer,
            target: Mutex::new(None),
        })
    }

    /// The address it calls.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn learned(&self) -> Option<NodeTarget> {
        self.target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn target(&self) -> Result<NodeTarget, tonic::Status> {
        if let Some(target) = self.learned() {
            return Ok(target);
        }
        let refusal = match Raw::new(self.channel.clone())
            .query(crate::auth::identity_probe(v1::WitnessQuery {
                key: String::new(),
            }))
            .await
        {
            Ok(_) => {
                return Err(tonic::Status::failed_precondition(format!(
                    "the witness at {} answered an unsigned request",
                    self.address
                )));
            }
            Err(refusal) => refusal,
        };
        let target = NodeTarget::from_refusal(&refusal).ok_or_else(|| {
            tonic::Status::new(
                refusal.code(),
                format!(
                    "cannot learn who the witness at {} is: {}",
                    self.address,
                    refusal.message()
                ),
            )
        })?;
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(target.clone());
        Ok(target)
    }

    fn forget_after(&self, status: &tonic::Status) -> bool {
        if status.code() == tonic::Code::Unauthenticated
            && NodeTarget::from_refusal(status).is_some()
        {
            *self.target.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return true;
        }
        false
    }

    /// Signs `message` for `method` and sends it with `send`; asks for the witness's
    /// identity again once when it refuses the one learned.
    async fn call<M, F, Fut>(
        &self,
        method: &str,
        message: M,
        send: F,
    ) -> Result<v1::WitnessGrant, tonic::Status>
    where
        M: prost::Message + Clone,
        F: Fn(Raw<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<v1::WitnessGrant>, tonic::Status>>,
    {
        let mut attempt = 0;
        loop {
            let target = self.target().await?;
            let request = self
                .signer
                .sign(method, &target, message.clone())
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            match send(Raw::new(self.channel.clone()), request).await {
                Ok(answer) => return Ok(answer.into_inner()),
                Err(status) if attempt == 0 && self.forget_after(&status) => attempt += 1,
                Err(status) => return Err(status),
            }
        }
    }

    /// `Witness.Claim` of `key` for `claimant` (the signer's trusted name), for
    /// `lease_ms`. A refusal to grant is an answer (`granted` false, with the holder),
    /// not an error.
    pub async fn claim(
        &self,
        key: &str,
        claimant: &str,
        lease_ms: u64,
    ) -> Result<v1::WitnessGrant, tonic::Status> {
        let message = v1::WitnessClaim {
            key: key.to_owned(),
            claimant: claimant.to_owned(),
            lease_ms,
        };
        self.call(
            methods::WITNESS_CLAIM,
            message,
            |mut raw, request| async move { raw.claim(request).await },
        )
        .await
    }

    /// `Witness.Query` of `key`.
    pub async fn query(&self, key: &str) -> Result<v1::WitnessGrant, tonic::Status> {
        let message = v1::WitnessQuery {
            key: key.to_owned(),
        };
        self.call(
            methods::WITNESS_QUERY,
            message,
            |mut raw, request| async move { raw.query(request).await },
        )
        .await
    }
}
