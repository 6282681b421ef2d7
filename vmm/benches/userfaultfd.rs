//! userfaultfd on this host, as groundwork for post-copy migration (issue 17): what one
//! missing-page fault costs when another thread resolves it with `UFFDIO_COPY`, against
//! the host's own first-touch fault on anonymous memory (the baseline, same run).
//!
//! A region of anonymous memory is registered with `UFFDIO_REGISTER_MODE_MISSING`; a
//! handler thread polls the userfaultfd, reads each fault and copies a 4 KiB page in
//! (`UFFDIO_COPY`, which also wakes the faulting thread); the faulting thread touches
//! each page once and times each touch. Printed: median and p99 per fault, pages per
//! second, for `UFFDIO_COPY` and for `UFFDIO_ZEROPAGE`, and the ratio to a plain
//! first-touch fault.
//!
//! Run: `cargo bench -p vmm --bench userfaultfd` (`CAIRN_BENCH_RUNS=N` rounds of 16,384
//! pages each, default 5).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const PAGES: usize = 16_384;

// Linux x86_64 userfaultfd ABI (include/uapi/linux/userfaultfd.h); the libc crate does
// not carry it.
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved: [u8; 7],
    flags: u64,
    address: u64,
    feature: u64,
}

fn map(bytes: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping with no address hint; the result is checked.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(address, libc::MAP_FAILED, "mmap");
    address.cast()
}

fn unmap(address: *mut u8, bytes: usize) {
    // SAFETY: `address` is a mapping of `bytes` made by `map` and not used after this.
    unsafe { libc::munmap(address.cast(), bytes) };
}

/// Touches every page of `base` once (one byte written), timing each touch.
fn touch_all(base: *mut u8) -> Vec<Duration> {
    let mut times = Vec::with_capacity(PAGES);
    for page in 0..PAGES {
        let start = Instant::now();
        // SAFETY: `base` maps PAGES pages; a volatile write so the touch happens.
        unsafe { base.add(page * PAGE).write_volatile(1) };
        times.push(start.elapsed());
    }
    times
}

fn summarize(label: &str, mut times: Vec<Duration>, total: Duration) -> f64 {
    times.sort();
    let median = times[times.len() / 2];
    let p99 = times[times.len() * 99 / 100];
    println!(
        "{label:<44} median {:>7.2} µs  p99 {:>8.2} µs  {:>9.0} pages/s",
        median.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        PAGES as f64 / total.as_secs_f64()
    );
    median.as_secs_f64()
}

/// First-touch faults of plain anonymous memory (the kernel zero-fills).
fn plain_faults() -> (Vec<Duration>, Duration) {
    let base = map(PAGES * PAGE);
    let start = Instant::now();
    let times = touch_all(base);
    let total = start.elapsed();
    unmap(base, PAGES * PAGE);
    (times, total)
}

/// Missing faults resolved by a handler thread with `UFFDIO_COPY` (or ZEROPAGE).
fn userfault_faults(zeropage: bool) -> Result<(Vec<Duration>, Duration), String> {
    // SAFETY: the userfaultfd syscall takes flags only and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(format!(
            "userfaultfd: {} (vm.unprivileged_userfaultfd, or not built in)",
            std::io::Error::last_os_error()
        ));
    }
    let fd = fd as libc::c_int;
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    // SAFETY: `api` is a valid uffdio_api the ioctl reads and writes.
    if unsafe { libc::ioctl(fd, UFFDIO_API, &mut api) } != 0 {
        return Err(format!("UFFDIO_API: {}", std::io::Error::last_os_error()));
    }
    let base = map(PAGES * PAGE);
    let mut register = UffdioRegister {
        range: UffdioRange {
            start: base as u64,
            len: (PAGES * PAGE) as u64,
        },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: `register` names the mapping just made; the ioctl fills `ioctls`.
    if unsafe { libc::ioctl(fd, UFFDIO_REGISTER, &mut register) } != 0 {
        return Err(format!(
            "UFFDIO_REGISTER: {}",
            std::io::Error::last_os_error()
        ));
    }
    let source = vec![0x5au8; PAGE];
    let source_address = source.as_ptr() as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut poll = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            while !stop.load(Ordering::Acquire) {
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut poll, 1, 10) } <= 0 {
                    continue;
                }
                let mut message = UffdMsg::default();
                // SAFETY: reads at most one uffd_msg (32 bytes) into `message`.
                let read = unsafe {
                    libc::read(
                        fd,
                        (&mut message as *mut UffdMsg).cast(),
                        std::mem::size_of::<UffdMsg>(),
                    )
                };
                if read != std::mem::size_of::<UffdMsg>() as isize
                    || message.event != UFFD_EVENT_PAGEFAULT
                {
                    continue;
                }
                let page = message.address & !(PAGE as u64 - 1);
                let result = if zeropage {
                    let mut zero = UffdioZeropage {
                        range: UffdioRange {
                            start: page,
                            len: PAGE as u64,
                        },
                        ..Default::default()
                    };
                    // SAFETY: the range is one registered page that is missing.
                    unsafe { libc::ioctl(fd, UFFDIO_ZEROPAGE, &mut zero) }
                } else {
                    let mut copy = UffdioCopy {
                        dst: page,
                        src: source_address,
                        len: PAGE as u64,
                        ..Default::default()
                    };
                    // SAFETY: `src` is a live 4 KiB buffer (kept alive by the caller
                    // until this thread is joined); `dst` a registered missing page.
                    unsafe { libc::ioctl(fd, UFFDIO_COPY, &mut copy) }
                };
                let _ = result;
            }
        })
    };
    let start = Instant::now();
    let times = touch_all(base);
    let total = start.elapsed();
    stop.store(true, Ordering::Release);
    handler.join().expect("handler");
    drop(source);
    unmap(base, PAGES * PAGE);
    // SAFETY: the fd is ours and closed once.
    unsafe { libc::close(fd) };
    Ok((times, total))
}

fn main() {
    let runs: usize = std::env::var("CAIRN_BENCH_RUNS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(5)
        .max(1);
    println!(
        "userfaultfd on this host ({} rounds of {PAGES} pages; per-touch latency from the faulting thread)",
        runs
    );
    let mut plain = (Vec::new(), Duration::ZERO);
    let mut copy = (Vec::new(), Duration::ZERO);
    let mut zero = (Vec::new(), Duration::ZERO);
    for _ in 0..runs {
        let (times, total) = plain_faults();
        plain.0.extend(times);
        plain.1 += total;
        match userfault_faults(false) {
            Ok((times, total)) => {
                copy.0.extend(times);
                copy.1 += total;
            }
            Err(error) => {
                println!("userfaultfd unusable: {error}");
                return;
            }
        }
        let (times, total) = userfault_faults(true).expect("userfaultfd");
        zero.0.extend(times);
        zero.1 += total;
    }
    let per_run = |total: Duration| total / runs as u32;
    let baseline = summarize(
        "first touch, kernel zero-fill (baseline)",
        plain.0,
        per_run(plain.1),
    );
    let copied = summarize(
        "missing fault → handler thread → UFFDIO_COPY",
        copy.0,
        per_run(copy.1),
    );
    let zeroed = summarize(
        "missing fault → handler thread → ZEROPAGE",
        zero.0,
        per_run(zero.1),
    );
    println!(
        "ratio to the baseline (median): UFFDIO_COPY {:.1}×, UFFDIO_ZEROPAGE {:.1}×",
        copied / baseline,
        zeroed / baseline
    );
}
