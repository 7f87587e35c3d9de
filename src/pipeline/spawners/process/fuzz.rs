//! Fuzzing the frames between a service and its worker processes: a worker's frames are
//! input the service must survive (arbitrary, truncated and oversized frames).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;

use super::protocol::{
    CallRequest, FrameReader, FrameWriter, FromWorker, Ready, Settlement, ToWorker,
};
use crate::data::fuzz_support::config;
use crate::data::Outcome;

/// The system allocator, noting the largest allocation of each thread.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to `System`.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Read frames from `bytes` until the end or an error, on this thread; returns how many
/// frames were read and the largest allocation made meanwhile.
fn read_all<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> (usize, usize) {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    LARGEST.with(|largest| largest.set(0));
    let mut reader = FrameReader::new(bytes);
    let mut frames = 0;
    runtime.block_on(async {
        while let Ok(Some(_)) = reader.next::<T>().await {
            frames += 1;
        }
    });
    (frames, LARGEST.with(Cell::get))
}

/// [`read_all`] with blocking reads, as a worker's call thread reads its calls.
fn read_all_blocking<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> (usize, usize) {
    LARGEST.with(|largest| largest.set(0));
    let mut reader = FrameReader::new(bytes);
    let mut frames = 0;
    while let Ok(Some(_)) = reader.next_blocking::<T>() {
        frames += 1;
    }
    (frames, LARGEST.with(Cell::get))
}

fn framed(frames: &[FromWorker]) -> Vec<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut writer = FrameWriter::new(Vec::new());
    runtime.block_on(async {
        for frame in frames {
            writer.push(frame).unwrap();
        }
        writer.flush().await.unwrap();
    });
    writer.into_inner()
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn arbitrary_bytes_are_refused_or_read(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for (_, largest) in [
            read_all::<FromWorker>(&bytes),
            read_all::<Ready>(&bytes),
            read_all::<Outcome>(&bytes),
            read_all_blocking::<CallRequest>(&bytes),
        ] {
            prop_assert!(largest < 1 << 20, "{largest} bytes allocated");
        }
        read_all::<ToWorker>(&bytes);
    }

    #[test]
    fn damaged_frames_never_panic(
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let mut bytes = framed(&[
            FromWorker::Cancel { consumer: 7 },
            FromWorker::Settle { delivery: 3, settlement: Settlement::Ack },
            FromWorker::Cancel { consumer: 8 },
        ]);
        for (at, byte) in flips {
            let index = at.index(bytes.len());
            bytes[index] ^= byte;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        let (frames, largest) = read_all::<FromWorker>(&bytes);
        prop_assert!(frames <= 3);
        prop_assert!(largest < 1 << 20, "{largest} bytes allocated");
    }

    #[test]
    fn huge_length_prefixes_allocate_what_arrives(length in any::<u32>(), sent in 0usize..2048) {
        let mut bytes = length.to_be_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(b' ', sent));
        for (frames, largest) in [
            read_all::<FromWorker>(&bytes),
            read_all_blocking::<CallRequest>(&bytes),
        ] {
            prop_assert_eq!(frames, 0);
            prop_assert!(largest < 1 << 20, "{largest} bytes allocated for a {length}-byte prefix");
        }
    }
}

/// Regression: a length prefix just under the limit followed by nothing used to allocate
/// the whole 256 MiB buffer up front.
#[test]
fn a_bare_length_prefix_does_not_allocate_the_frame() {
    let prefix = (256u32 * 1024 * 1024).to_be_bytes();
    for (frames, largest) in [read_all::<FromWorker>(&prefix), read_all_blocking::<Ready>(&prefix)]
    {
        assert_eq!(frames, 0);
        assert!(largest < 1 << 20, "{largest} bytes allocated");
    }
}
