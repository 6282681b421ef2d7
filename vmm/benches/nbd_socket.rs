//! What the unix socket between cairn-vmm and cairn-node costs a VM disk write, and
//! what `nbd_client::SOCKET_BUFFER` changes there: the socket alone, no node.
//!
//! `cargo bench -p vmm --bench nbd_socket`: one writer sends NBD-write-shaped requests
//! one at a time (qd1) over a unix socket pair, a 28-byte header and a 1 MiB payload in
//! one `writev`, as `NbdBackend` does; the receiver reads them through a 1 MiB
//! `BufReader` into a fresh buffer, as the node's NBD server does, and answers 16
//! bytes. The sender's socket buffer is the kernel's default or `SOCKET_BUFFER`
//! (`SO_SNDBUFFORCE`: root); the two arms alternate, each round `WRITES` requests.
//! Prints each arm's median over `ROUNDS` rounds and their ratio. Compare with the
//! 6-7.5 ms a 1 MiB write takes through the node (`node-runtime --bench vm_disk`).
//!
//! Not a test: it asserts nothing and prints figures.

use std::io::{BufReader, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm::devices::nbd_client::SOCKET_BUFFER;

const ROUNDS: usize = 9;
const WRITES: usize = 512;
const PAYLOAD: usize = 1 << 20;

/// MiB/s of `WRITES` qd1 requests with the sender's buffer at `buffer` (0: default).
fn round(buffer: usize) -> f64 {
    let (mut client, server) = UnixStream::pair().expect("socket pair");
    if buffer > 0 {
        let value = libc::c_int::try_from(buffer).expect("fits");
        // SAFETY: the descriptor is an open socket owned by `client`; `value` is a live
        // c_int and the length given is its size.
        let result = unsafe {
            libc::setsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(result, 0, "SO_SNDBUFFORCE needs root (CAP_NET_ADMIN)");
    }
    let receiver = std::thread::spawn(move || {
        let mut replies = server.try_clone().expect("clone");
        let mut reader = BufReader::with_capacity(1 << 20, server);
        let mut header = [0u8; 28];
        while reader.read_exact(&mut header).is_ok() {
            let mut data = vec![0u8; PAYLOAD];
            reader.read_exact(&mut data).expect("payload");
            std::hint::black_box(&data);
            replies.write_all(&[0u8; 16]).expect("reply");
        }
    });
    let payload = vec![7u8; PAYLOAD];
    let header = [1u8; 28];
    let started = Instant::now();
    for _ in 0..WRITES {
        let mut slices = [IoSlice::new(&header), IoSlice::new(&payload)];
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            let sent = client.write_vectored(slices).expect("writev");
            IoSlice::advance_slices(&mut slices, sent);
        }
        let mut reply = [0u8; 16];
        client.read_exact(&mut reply).expect("reply");
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(client);
    receiver.join().expect("receiver");
    (WRITES * PAYLOAD) as f64 / f64::from(1u32 << 20) / seconds
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if std::env::args().any(|argument| argument == "--list") {
        return;
    }
    let (mut default, mut larger) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        default.push(round(0));
        larger.push(round(SOCKET_BUFFER));
    }
    let (default, larger) = (median(default), median(larger));
    println!(
        "qd1 1 MiB NBD-shaped writes over a unix socket, medians of {ROUNDS} rounds of {WRITES}: kernel default buffer {default:.0} MiB/s ({:.3} ms per MiB), {} MiB buffer {larger:.0} MiB/s ({:.3} ms per MiB), ratio {:.2}×",
        1000.0 / default,
        SOCKET_BUFFER >> 20,
        1000.0 / larger,
        larger / default
    );
}
