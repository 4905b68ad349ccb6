//! What reading a frame allocates, counted by a global allocator: a peer
//! that announces a large frame and sends a few bytes makes the reader hold
//! about what it sent, not what it announced.
#![cfg(feature = "libp2p")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::ErrorKind;

use cohort_protocol::framing::{read_frame, CHUNK};

/// The system allocator, counting the bytes live on each thread and their
/// peak (per thread: tests run in parallel).
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grow(n: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + n;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

fn shrink(n: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(n)));
}

#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrink(layout.size());
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counted as both live while the copy happens.
        grow(new_size);
        shrink(layout.size());
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated on this thread while `f` runs, above what was live.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get) - base)
}

#[test]
fn a_large_announced_frame_with_a_short_body_allocates_little() {
    // 100 MB announced, 8 bytes sent, then the stream ends.
    let mut wire = (100u64 << 20).to_le_bytes().to_vec();
    wire.extend_from_slice(b"8 bytes!");
    let (result, peak) = peak_of(|| {
        let mut r = futures::io::Cursor::new(&wire[..]);
        futures::executor::block_on(read_frame(&mut r, 256 << 20))
    });
    let e = result.expect_err("the stream ends early");
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
    assert!(peak <= 2 * CHUNK, "peak {peak} bytes for 8 received");
}

#[test]
fn a_whole_frame_allocates_about_its_size() {
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
    let wire = cohort_protocol::framing::frame(&payload);
    let (result, peak) = peak_of(|| {
        let mut r = futures::io::Cursor::new(&wire[..]);
        futures::executor::block_on(read_frame(&mut r, 256 << 20))
    });
    assert_eq!(result.expect("frame"), payload);
    // The buffer grows by doubling what arrived: at most about 3x the
    // frame while a step's reallocation copies (old and new live together).
    assert!(peak <= 3 * payload.len() + 4 * CHUNK, "peak {peak}");
}
