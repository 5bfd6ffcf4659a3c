//! mimalloc can lose track of the purges it has scheduled, and then keeps freed memory resident
//! until something forces a collection (`flowgate::allocator::spawn_purge_janitor` says how).
//! This test leaves mimalloc in that state on purpose, as the race does, and checks that the
//! janitor gives the memory back. (Alone in its test binary: it reads this process's RSS, and
//! uses mimalloc as the global allocator like the flowgate binary.)

use std::time::{Duration, Instant};

use flowgate::allocator::MI_OPTION_PURGE_DELAY;

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's process-wide state (`mi_subproc_t`); internal, but exported.
    fn _mi_subproc_main() -> *mut u8;
}

/// Offsets into mimalloc v3's structs as libmimalloc-sys 0.1.49 builds them (from `offsetof`
/// against its headers). Checked before use: a newer mimalloc fails the check instead of having
/// this test write into the wrong field.
const SUBPROC_ARENA_COUNT: usize = 24;
const SUBPROC_ARENAS: usize = 32;
const SUBPROC_PURGE_EXPIRE: usize = 1352;
const ARENA_SUBPROC: usize = 24;
const ARENA_PURGE_EXPIRE: usize = 64;
const MAX_ARENAS: usize = 160;

/// What arenas wait before purging (10 times the option): long enough that freeing the churn
/// does not itself reach a purge that is due, as it does with the gateway's 10 ms.
const ARENA_PURGE_DELAY: Duration = Duration::from_millis(200);

const MB: usize = 1024 * 1024;
/// Memory allocated and freed in each round: far above the noise of a test process's RSS.
const CHURN_BYTES: usize = 64 * MB;

fn rss_bytes() -> usize {
    common::rss_kb() as usize * 1024
}

/// Allocates `CHURN_BYTES` in 1 KB blocks (small pages, as a gateway's calls use), touches them,
/// and frees them; then collects this thread's heap, so the freed pages go back to their arena and
/// are scheduled for purging (due after `ARENA_PURGE_DELAY`).
fn allocate_and_free() {
    let blocks: Vec<Vec<u8>> = (0..CHURN_BYTES / 1024)
        .map(|i| vec![i as u8; 1024])
        .collect();
    assert!(rss_bytes() > CHURN_BYTES, "the blocks are resident");
    drop(blocks);
    // SAFETY: collects the calling thread's heap; never forced here.
    unsafe { libmimalloc_sys::mi_collect(false) };
}

/// What a thread freeing a page does, for twice the purge delay: purge if the process-wide expiry
/// says one is due. (A normal collection of this thread's heap ends with exactly that call.)
fn purge_if_due() {
    let started = Instant::now();
    while started.elapsed() < 2 * ARENA_PURGE_DELAY {
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: as above.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

/// mimalloc's process-wide purge expiry, after checking that the offsets fit this mimalloc.
fn process_purge_expiry() -> *mut i64 {
    // SAFETY: reads mimalloc's static process state at offsets checked against each other: the
    // arena count must be plausible and the first arena must point back at this state.
    unsafe {
        let subproc = _mi_subproc_main();
        let count = *(subproc.add(SUBPROC_ARENA_COUNT) as *const usize);
        assert!(
            (1..=MAX_ARENAS).contains(&count),
            "mimalloc's layout changed ({count} arenas?): update this test's offsets"
        );
        let arena = *(subproc.add(SUBPROC_ARENAS) as *const *mut u8);
        assert!(
            !arena.is_null(),
            "mimalloc's layout changed: no first arena"
        );
        let back = *(arena.add(ARENA_SUBPROC) as *const *mut u8);
        assert_eq!(
            back, subproc,
            "mimalloc's layout changed: update this test's offsets"
        );
        let arena_expiry = *(arena.add(ARENA_PURGE_EXPIRE) as *const i64);
        assert_ne!(arena_expiry, 0, "the arena has a purge pending");
        subproc.add(SUBPROC_PURGE_EXPIRE) as *mut i64
    }
}

#[test]
fn the_janitor_returns_memory_mimalloc_lost_track_of() {
    let delay_option = (ARENA_PURGE_DELAY.as_millis() / 10) as std::ffi::c_long;
    // SAFETY: sets a process-wide allocator option.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, delay_option) };
    allocate_and_free();
    purge_if_due();
    let baseline = rss_bytes();

    // As the race leaves it: a purge pending in the arena, none in the process-wide expiry.
    allocate_and_free();
    let expiry = process_purge_expiry();
    // SAFETY: an aligned i64 in mimalloc's static state (checked above); mimalloc itself stores
    // 0 here when a purge visit finds nothing to do.
    unsafe { std::ptr::write_volatile(expiry, 0) };
    purge_if_due();
    let stuck = rss_bytes();
    eprintln!(
        "RSS {} MB after a purge, {} MB with the purge lost",
        baseline / MB,
        stuck / MB
    );
    assert!(
        stuck > baseline + CHURN_BYTES / 2,
        "with the process-wide expiry cleared, nothing should purge (RSS {} MB, {} MB before): \
         if mimalloc no longer gets stuck, the janitor may no longer be needed",
        stuck / MB,
        baseline / MB
    );

    flowgate::allocator::spawn_purge_janitor(Duration::from_millis(100)).expect("janitor thread");
    let started = Instant::now();
    while rss_bytes() > baseline + CHURN_BYTES / 4 && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = rss_bytes();
    eprintln!(
        "RSS {} MB {} ms after the janitor started",
        after / MB,
        started.elapsed().as_millis()
    );
    assert!(
        after <= baseline + CHURN_BYTES / 4,
        "the janitor did not give the memory back: RSS {} MB, {} MB before the churn",
        after / MB,
        baseline / MB
    );
}
