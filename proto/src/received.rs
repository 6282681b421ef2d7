//! The bytes a request arrived as: the SHA-256 of its first gRPC message, taken from
//! the HTTP/2 body while tonic reads it, so [`crate::auth::Verifier`] can check a
//! signature against what the caller encoded and sent, not against the message as
//! this build decodes and encodes it again.
//!
//! Why (version skew, issue 24 item 7): a caller signs the SHA-256 of the message it
//! encodes. A receiver that knows fewer fields drops the unknown ones while decoding
//! (prost), so the hash of its re-encoding differs and a correct signature failed to
//! verify: a 1.N node refused every request of a 1.N+1 controller that set a field new
//! in 1.N+1. With the received hash the signature covers exactly the bytes sent, and
//! those bytes decode into exactly what the receiver acts on (decoding is a function
//! of the bytes), so nothing is lost in soundness: the unknown fields are signed and
//! ignored. A field whose absence changes behaviour is still kept from an older node
//! by its caller ([`crate::protocol::requires`]).
//!
//! How: [`hash_first_message`] wraps a request's body in [`HashFirstMessage`], which
//! parses the gRPC length-prefixed framing of the first message as the chunks pass
//! (no copy, no buffering, streams unaffected) and fills the request's
//! [`ReceivedBody`] extension once the message is complete; tonic copies the HTTP
//! extensions into `tonic::Request::extensions`, and a unary handler runs only after
//! its message was read whole. A compressed message (flag 1) leaves it empty: the
//! verifier then hashes the decoded message as before. [`HashBodiesLayer`] is the
//! tower layer for a `tonic::transport::Server`.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http_body::{Body, Frame};
use sha2::{Digest, Sha256};
use tonic::codegen::{Bytes, http};

/// The environment variable that turns the received-bytes hash off
/// ([`crate::protocol::EMULATE`] does too): the receiver then verifies against its
/// re-encoding, as every build before this one did.
pub const OFF: &str = "CAIRN_VERIFY_REENCODED";

/// The SHA-256 of a request's first message as received, once it was read whole
/// (a request extension; clones share the value).
#[derive(Debug, Clone, Default)]
pub struct ReceivedBody(Arc<OnceLock<[u8; 32]>>);

impl ReceivedBody {
    /// A slot holding `sha256` already (tests, and a caller that read the body itself).
    pub fn of(sha256: [u8; 32]) -> Self {
        let slot = Self::default();
        let _ = slot.0.set(sha256);
        slot
    }

    /// The hash, when the first message was read whole and not compressed.
    pub fn sha256(&self) -> Option<[u8; 32]> {
        self.0.get().copied()
    }
}

/// Whether this process hashes received bodies (not with [`OFF`] set, nor while it
/// emulates an older protocol minor).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(OFF).is_none() && crate::protocol::emulated().is_none())
}

enum State {
    /// Reading the 5-byte prefix: compression flag and big-endian length.
    Prefix { bytes: [u8; 5], have: usize },
    /// Hashing the message, `left` bytes still to come.
    Message { hasher: Sha256, left: usize },
    /// The first message is hashed (or cannot be): pass the rest through.
    Done,
}

/// A request body that hashes its first gRPC message as it passes.
pub struct HashFirstMessage<B> {
    inner: Pin<Box<B>>,
    state: State,
    slot: ReceivedBody,
}

impl<B> std::fmt::Debug for HashFirstMessage<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashFirstMessage")
            .field("hashed", &self.slot.sha256().is_some())
            .finish_non_exhaustive()
    }
}

impl<B> HashFirstMessage<B> {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Prefix { bytes, have } => {
                    let take = (5 - *have).min(data.len());
                    bytes[*have..*have + take].copy_from_slice(&data[..take]);
                    *have += take;
                    data = &data[take..];
                    if *have == 5 {
                        let length =
                            u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
                        if bytes[0] != 0 {
                            // Compressed: the signed bytes are the uncompressed ones.
                            self.state = State::Done;
                        } else {
                            self.state = State::Message {
                                hasher: Sha256::new(),
                                left: length,
                            };
                            self.finish_if_complete();
                        }
                    }
                }
                State::Message { hasher, left } => {
                    let take = (*left).min(data.len());
                    hasher.update(&data[..take]);
                    *left -= take;
                    data = &data[take..];
                    self.finish_if_complete();
                }
                State::Done => return,
            }
        }
    }

    fn finish_if_complete(&mut self) {
        if let State::Message { left: 0, .. } = self.state
            && let State::Message { hasher, .. } = std::mem::replace(&mut self.state, State::Done)
        {
            let _ = self.slot.0.set(hasher.finalize().into());
        }
    }
}

impl<B> Body for HashFirstMessage<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && !matches!(self.state, State::Done)
        {
            let data = data.clone();
            self.feed(&data);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// `request` with its body hashed as it is read and a [`ReceivedBody`] extension the
/// hash lands in (left empty when this process does not hash, [`enabled`]).
pub fn hash_first_message<B>(request: http::Request<B>) -> http::Request<HashFirstMessage<B>> {
    let slot = ReceivedBody::default();
    let (mut parts, body) = request.into_parts();
    let state = if enabled() {
        parts.extensions.insert(slot.clone());
        State::Prefix {
            bytes: [0; 5],
            have: 0,
        }
    } else {
        State::Done
    };
    http::Request::from_parts(
        parts,
        HashFirstMessage {
            inner: Box::pin(body),
            state,
            slot,
        },
    )
}

/// The tower layer of [`hash_first_message`], for `tonic::transport::Server::layer`.
#[derive(Debug, Clone, Copy, Default)]
pub struct HashBodiesLayer;

impl<S> tower_layer::Layer<S> for HashBodiesLayer {
    type Service = HashBodies<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HashBodies(inner)
    }
}

/// The service of [`HashBodiesLayer`].
#[derive(Debug, Clone)]
pub struct HashBodies<S>(S);

impl<S, B> tonic::codegen::Service<http::Request<B>> for HashBodies<S>
where
    S: tonic::codegen::Service<http::Request<HashFirstMessage<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        self.0.call(hash_first_message(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(message: &[u8], flag: u8) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    fn hashed(chunks: &[&[u8]]) -> Option<[u8; 32]> {
        let mut body = HashFirstMessage {
            inner: Box::pin(http_body_empty()),
            state: State::Prefix {
                bytes: [0; 5],
                have: 0,
            },
            slot: ReceivedBody::default(),
        };
        for chunk in chunks {
            body.feed(chunk);
        }
        body.slot.sha256()
    }

    fn http_body_empty() -> tonic::body::Body {
        tonic::body::Body::empty()
    }

    #[test]
    fn the_first_message_is_hashed_whatever_the_chunking_and_a_compressed_one_is_not() {
        let message = b"\x0a\x03abc\xc2\x3e\x02zz".to_vec();
        let expected: [u8; 32] = Sha256::digest(&message).into();
        let wire = [framed(&message, 0), framed(b"second", 0)].concat();
        assert_eq!(hashed(&[&wire]), Some(expected));
        for cut in 1..wire.len() {
            assert_eq!(
                hashed(&[&wire[..cut], &wire[cut..]]),
                Some(expected),
                "cut at {cut}"
            );
        }
        let bytewise: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(hashed(&bytewise), Some(expected));
        // Incomplete: nothing yet.
        assert_eq!(hashed(&[&wire[..7]]), None);
        // An empty message hashes as empty.
        let empty: [u8; 32] = Sha256::digest(b"").into();
        assert_eq!(hashed(&[&framed(b"", 0)]), Some(empty));
        // Compressed: left to the decoded message.
        assert_eq!(hashed(&[&framed(&message, 1)]), None);
    }
}
