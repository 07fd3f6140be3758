//! Denormal floats flushed to zero in every thread that computes.
//!
//! # Why
//!
//! As students grow confident, softmax outputs, KL gradients and optimizer
//! moments fall below `f32::MIN_POSITIVE` (≈ 1.2e-38) into the subnormal
//! range, where x86 cores take a microcode assist on every operation that
//! reads or produces one. A federation's rounds then slow down as it learns
//! at constant work (measured: 7 rounds 1.4 → 3.9 s of training each; the
//! whole run 23.3 s instead of 12.9 s with flushing; issue 18).
//!
//! # What
//!
//! [`flush_denormals`] sets, for the calling thread, flush-to-zero (results
//! that would be subnormal become ±0) and denormals-are-zero (subnormal
//! inputs read as ±0): MXCSR bits FTZ (15) and DAZ (6) on x86-64, FPCR.FZ
//! (24) on aarch64 (which covers both). Numerically only values of
//! magnitude below ≈ 1.2e-38 change, to 0; results stay deterministic (the
//! same inputs give the same bits on every run).
//!
//! The floating-point environment is per thread, and a new thread starts
//! from its creator's. So the binaries call it first thing in `main`, and
//! every pool we create runs it at thread start as well (the learner's
//! rayon pools, [`computing_pool`]; tokio's workers and blocking threads,
//! [`runtime`]; rayon's global pool, [`install_global_pool`]) so no thread
//! depends on where it was created from. Tests read the bits back inside
//! each kind of thread.

/// Sets flush-to-zero and denormals-are-zero for the calling thread.
/// A no-op on architectures other than x86-64 and aarch64.
pub fn flush_denormals() {
    arch::set(arch::read() | arch::FLUSH_BITS);
}

/// Whether the calling thread flushes denormals (both bits set).
pub fn denormals_flushed() -> bool {
    arch::FLUSH_BITS != 0 && arch::read() & arch::FLUSH_BITS == arch::FLUSH_BITS
}

/// A rayon pool of `threads` named `name-<i>` whose threads flush denormals.
pub fn computing_pool(threads: usize, name: &'static str) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(|_| flush_denormals())
        .build()
        .expect("cannot start a computing thread pool")
}

/// Rayon's global pool (used by kernels called outside a learner's pool)
/// with threads that flush denormals. Does nothing if it already exists.
pub fn install_global_pool() {
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(|_| flush_denormals())
        .build_global();
}

/// The multi-threaded tokio runtime of the binaries: every worker and
/// blocking thread flushes denormals.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(flush_denormals)
        .build()
}

// The crate denies `unsafe_code`; reading and writing the FP control register
// needs inline assembly, one instruction each, with its SAFETY note.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod arch {
    /// MXCSR: flush-to-zero (bit 15) and denormals-are-zero (bit 6).
    pub const FLUSH_BITS: u32 = (1 << 15) | (1 << 6);

    pub fn read() -> u32 {
        let mut csr = 0u32;
        // SAFETY: `stmxcsr` stores the 32-bit MXCSR register of this thread
        // into the 4 bytes at the given address, which is `csr`, a live,
        // aligned, writable u32; it touches nothing else.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
        }
        csr
    }

    pub fn set(csr: u32) {
        // SAFETY: `ldmxcsr` loads MXCSR from the 4 bytes at the address of
        // `csr`, a live u32. Only the FTZ/DAZ bits differ from the current
        // value (callers OR them in), which changes rounding of subnormals
        // only; no reserved bit is set, so it cannot fault.
        unsafe {
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly, preserves_flags));
        }
    }
}

#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod arch {
    /// FPCR.FZ (bit 24): flush subnormal inputs and outputs to zero.
    pub const FLUSH_BITS: u64 = 1 << 24;

    pub fn read() -> u64 {
        let fpcr: u64;
        // SAFETY: reading FPCR has no side effect and is allowed at EL0.
        unsafe {
            std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack, preserves_flags));
        }
        fpcr
    }

    pub fn set(fpcr: u64) {
        // SAFETY: writing FPCR at EL0 is allowed; callers only add the FZ bit.
        unsafe {
            std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack, preserves_flags));
        }
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod arch {
    pub const FLUSH_BITS: u32 = 0;
    pub fn read() -> u32 {
        0
    }
    pub fn set(_: u32) {}
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;

    /// A subnormal input and a subnormal result, computed where the compiler cannot fold them.
    fn subnormal_arithmetic() -> (f32, f32) {
        let tiny = std::hint::black_box(f32::MIN_POSITIVE / 4.0);
        let (one, half) = std::hint::black_box((1.0f32, 0.5f32));
        (tiny * one, f32::MIN_POSITIVE * half)
    }

    #[test]
    fn every_kind_of_computing_thread_flushes_denormals() {
        // A thread that did nothing computes subnormals as IEEE says.
        let plain = std::thread::spawn(|| (denormals_flushed(), subnormal_arithmetic()))
            .join()
            .unwrap();
        if !plain.0 {
            assert!(plain.1.0 > 0.0 && plain.1.1 > 0.0, "{:?}", plain.1);
        }

        let flushed = std::thread::spawn(|| {
            flush_denormals();
            (denormals_flushed(), subnormal_arithmetic())
        })
        .join()
        .unwrap();
        assert_eq!(flushed, (true, (0.0, 0.0)));

        // The learners' rayon pools.
        let pool = computing_pool(2, "fpenv-test");
        let in_pool = pool.install(|| {
            rayon::broadcast(|_| (denormals_flushed(), subnormal_arithmetic()))
        });
        assert_eq!(in_pool, vec![(true, (0.0, 0.0)); 2]);

        // Tokio's workers and blocking threads.
        let rt = runtime().unwrap();
        let (worker, blocking) = rt.block_on(async {
            let worker = tokio::spawn(async { denormals_flushed() }).await.unwrap();
            let blocking = tokio::task::spawn_blocking(|| (denormals_flushed(), subnormal_arithmetic()))
                .await
                .unwrap();
            (worker, blocking)
        });
        assert!(worker);
        assert_eq!(blocking, (true, (0.0, 0.0)));
    }
}
