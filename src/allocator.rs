//! The allocator's tuning. The binary's global allocator is mimalloc (`main.rs`); these settings
//! decide how soon the memory it frees goes back to the OS, which is most of what RSS under load
//! is made of.

use std::time::Duration;

/// `mi_option_purge_delay` in mimalloc.h (stable across v2 and v3; libmimalloc-sys has no
/// constant for it).
pub const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc waits `mi_option_arena_purge_mult` (10) times this before purging arena memory: 10 ms.
const PURGE_DELAY_MS: std::ffi::c_long = 1;

/// How often the janitor (`spawn_purge_janitor`) makes mimalloc purge what it has left pending.
pub const PURGE_EVERY: Duration = Duration::from_secs(1);

/// Memory freed under load goes back to the OS within ~10 ms, a little at a time: RSS after 400k
/// closed-loop calls was 170 MB instead of 186-188 MB with 1 s (`purge_delay` 100, the setting
/// before), and CPU per call at 1000 RPS did not move beyond the noise (207 vs 208 µs), though
/// pages are faulted in again more often (65k vs 40k minor faults per 10k calls).
///
/// This was first chosen against ~18 ms stalls of closed-loop streams after a closed-loop burst,
/// which went away when mimalloc's purging was switched off. Those tests set
/// `MIMALLOC_PURGE_DELAY`, which the load harness's own mimalloc read too; the stalls came back
/// with this setting, and went away (8 runs of 8) once the harness paused between phases: they
/// were the previous phase's clean-up in the harness, not the gateway.
pub fn return_freed_memory_promptly() {
    // mimalloc's own variable still wins, for whoever tunes the allocator.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets a process-wide allocator option; mimalloc reads it on every purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

/// Starts a thread that has mimalloc purge, every `period`, the freed memory it has scheduled for
/// purging.
///
/// mimalloc v3 (libmimalloc-sys 0.1.49) can lose track of its scheduled purges. Each arena has
/// an expiry for its pending purges, and the process has one more saying whether any arena has
/// one; a thread that frees a page purges only when that second one is set and due. When a
/// thread's purge visit finds nothing to do it clears the process-wide expiry, and an arena
/// scheduling a purge at that moment sets its own but not the process-wide one (that is only set
/// when the arena's was unset). From then on no thread purges: freed memory stays resident until
/// a thread exits or someone forces a collection. Under the load harness's memory run this
/// happened in 2 of 14 closed-loop halves: RSS climbed for 17 s without a single drop, to 115 MB,
/// and fell by 15.7 MB at once when it ended (read from `/proc/<pid>/mem` in such a stall: the
/// process-wide expiry 0, the arena's 11-14 s past due).
///
/// A forced collection visits every arena whatever the process-wide expiry says, so a stuck purge
/// lasts at most `period`. It also purges what was freed in the last 10 ms a little early, which
/// at once a second is nothing. `tests/allocator.rs` puts mimalloc in the stuck state and checks
/// that this brings the memory back.
pub fn spawn_purge_janitor(period: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("flowgate-purge".to_owned())
        .spawn(move || {
            // SAFETY: plain mimalloc calls. The allocation gives this thread its own mimalloc heap,
            // without which `mi_collect` returns at once (the binary allocates through mimalloc
            // anyway; a test process may not).
            unsafe { libmimalloc_sys::mi_free(libmimalloc_sys::mi_malloc(1)) };
            loop {
                std::thread::sleep(period);
                // SAFETY: collects this thread's (nearly empty) heap and purges every arena's
                // pending ranges; safe to call from any thread at any time.
                unsafe { libmimalloc_sys::mi_collect(true) };
            }
        })?;
    Ok(())
}
