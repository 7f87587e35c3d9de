//! The status page's history with many routes: what it holds, measured by the allocator (a
//! test binary of its own, so that no other test allocates meanwhile).
#![cfg(feature = "metrics")]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::MetricsOnAnyPort;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::prelude::*;
use serde_json::Value;

/// The system allocator, counting the bytes allocated and not freed.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn on_event(Payload(_value): Payload<Value>) {}

fn routes(count: usize, source: &str) -> Vec<Route> {
    (0..count)
        .map(|i| {
            Route::new(on_event)
                .name(format!("route_number_{i}"))
                .entrypoint(EventListener::new(source.to_owned(), format!("event{i}")))
        })
        .collect()
}

/// It held 90 samples of every route's names and duration buckets: 64 MB more after 15 idle
/// minutes with 2000 routes (about 32 KB a route).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_status_history_of_an_idle_service_with_many_routes_stays_small() {
    const ROUTES: usize = 2000;
    let uri = format!("memory://{}", common::unique("statushistory"));
    let config = common::config(&uri, "statushistory").with_metrics_on_any_port();
    let source = common::unique("statushistorysrc");
    let service = Runner::new(routes(ROUTES, &source), config).spawn().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = LIVE_BYTES.load(Ordering::Relaxed);
    // 15 minutes and more: the history is full (90 samples, one every 10 s)
    for _ in 0..95 {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let idle = LIVE_BYTES.load(Ordering::Relaxed);
    service.stop().await.unwrap();
    let grown = idle.saturating_sub(started);
    eprintln!("{ROUTES} routes, 15 idle minutes: {grown} bytes more");
    assert!(
        grown < 100 * ROUTES,
        "an idle service of {ROUTES} routes holds {grown} bytes more after 15 minutes"
    );
}
