//! rustbpe: nanochat's byte-level BPE trainer, std only, with a C ABI for Python's ctypes.
//!
//! Python (nanochat/tokenizer.py) drives it like this:
//!
//! ```text
//! t = rb_trainer_new(n_threads, doc_cap, max_chars)
//! rb_trainer_feed(t, bytes, n_bytes, doc_lens, n_docs)   # repeatedly; returns 1 once max_chars is hit
//! n = rb_trainer_train(t, n_merges, progress_cb, out)    # out: 2 * n_merges u32, the merged pairs
//! rb_trainer_stats(t, out, 8); rb_trainer_free(t)
//! ```
//!
//! Every entry point catches panics, so a bug here surfaces as an error code in Python rather
//! than unwinding into the interpreter.

mod chunks;
mod hash;
mod pretok;
mod train;
mod unicode_tables;

use std::panic::{catch_unwind, AssertUnwindSafe};
use train::{TrainError, Trainer};

/// Progress callback: (phase, done, total) -> 0 to go on, non-zero to stop.
/// Phase 1: chunk tables merged (done = total = distinct chunks); phase 2: merges done so far.
pub type ProgressFn = extern "C" fn(u32, u64, u64) -> i32;

pub const ERR_ARGS: i64 = -1;
pub const ERR_PANIC: i64 = -2;
pub const ERR_ABORTED: i64 = -3;
pub const ERR_TRAINED: i64 = -4;

fn guard(f: impl FnOnce() -> i64) -> i64 {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(ERR_PANIC)
}

/// A new trainer using `n_threads` counting threads; 0 for `doc_cap` / `max_chars` means no limit.
#[no_mangle]
pub extern "C" fn rb_trainer_new(n_threads: u32, doc_cap: u64, max_chars: u64) -> *mut Trainer {
    Box::into_raw(Box::new(Trainer::new(n_threads as usize, doc_cap, max_chars)))
}

/// # Safety
/// `t` must come from `rb_trainer_new` and not be freed yet (or be null).
#[no_mangle]
pub unsafe extern "C" fn rb_trainer_free(t: *mut Trainer) {
    if !t.is_null() {
        drop(Box::from_raw(t));
    }
}

/// Counts `n_docs` documents laid end to end in `data` (lengths in `lens`, bytes, any content).
/// Returns 0, 1 once the character limit is reached, or a negative error code.
///
/// # Safety
/// `data` must hold `data_len` bytes and `lens` `n_docs` u64s; `t` as for `rb_trainer_free`.
#[no_mangle]
pub unsafe extern "C" fn rb_trainer_feed(t: *mut Trainer, data: *const u8, data_len: usize, lens: *const u64, n_docs: usize) -> i64 {
    if t.is_null() || (data.is_null() && data_len > 0) || (lens.is_null() && n_docs > 0) {
        return ERR_ARGS;
    }
    let t = &mut *t;
    let data = if data_len == 0 { &[][..] } else { std::slice::from_raw_parts(data, data_len) };
    let lens = if n_docs == 0 { &[][..] } else { std::slice::from_raw_parts(lens, n_docs) };
    if lens.iter().try_fold(0u64, |acc, &l| acc.checked_add(l)) != Some(data_len as u64) {
        return ERR_ARGS;
    }
    guard(|| {
        t.feed(data, lens);
        t.limit_reached() as i64
    })
}

/// Learns up to `n_merges` merges into `out` (pairs of token ids, 2 u32 per merge).
/// Returns the number of merges learnt (fewer when the corpus runs out of pairs) or an error code.
///
/// # Safety
/// `out` must have room for `2 * n_merges` u32; `t` as for `rb_trainer_free`.
#[no_mangle]
pub unsafe extern "C" fn rb_trainer_train(t: *mut Trainer, n_merges: u32, progress: Option<ProgressFn>, out: *mut u32) -> i64 {
    if t.is_null() || (out.is_null() && n_merges > 0) {
        return ERR_ARGS;
    }
    let t = &mut *t;
    guard(|| {
        let cb = |phase: u32, done: u64, total: u64| progress.is_none_or(|f| f(phase, done, total) == 0);
        match t.train(n_merges, cb) {
            Ok(merges) => {
                let out = std::slice::from_raw_parts_mut(out, 2 * n_merges as usize);
                for (i, &(a, b)) in merges.iter().enumerate() {
                    out[2 * i] = a;
                    out[2 * i + 1] = b;
                }
                merges.len() as i64
            }
            Err(TrainError::Aborted) => ERR_ABORTED,
            Err(TrainError::AlreadyTrained) => ERR_TRAINED,
        }
    })
}

/// Writes up to `n` statistics: docs, chars, bytes, replaced (invalid UTF-8 sequences),
/// capped_docs, limit_reached, chunks, unique_chunks. Returns how many were written.
///
/// # Safety
/// `out` must have room for `n` u64; `t` as for `rb_trainer_free`.
#[no_mangle]
pub unsafe extern "C" fn rb_trainer_stats(t: *const Trainer, out: *mut u64, n: usize) -> usize {
    if t.is_null() || out.is_null() {
        return 0;
    }
    let s = (*t).stats;
    let all = [s.docs, s.chars, s.bytes, s.replaced, s.capped_docs, s.limit_reached, s.chunks, s.unique_chunks];
    let n = n.min(all.len());
    std::ptr::copy_nonoverlapping(all.as_ptr(), out, n);
    n
}

/// Splits valid UTF-8 `text` into chunks, writing the byte offset where each ends into `ends`
/// (room for `cap`; `len` suffices since chunks are never empty). Returns the number of chunks,
/// or a negative error code if `text` is not UTF-8 or `ends` is too small.
///
/// # Safety
/// `text` must hold `len` bytes and `ends` `cap` u64s.
#[no_mangle]
pub unsafe extern "C" fn rb_split(text: *const u8, len: usize, ends: *mut u64, cap: usize) -> i64 {
    if len == 0 {
        return 0;
    }
    if text.is_null() || ends.is_null() {
        return ERR_ARGS;
    }
    let Ok(text) = std::str::from_utf8(std::slice::from_raw_parts(text, len)) else { return ERR_ARGS };
    let ends = std::slice::from_raw_parts_mut(ends, cap);
    guard(|| {
        let (mut n, mut pos) = (0usize, 0usize);
        let mut overflow = false;
        pretok::for_each_chunk(text, |chunk| {
            pos += chunk.len();
            if n < ends.len() {
                ends[n] = pos as u64;
            } else {
                overflow = true;
            }
            n += 1;
        });
        if overflow { ERR_ARGS } else { n as i64 }
    })
}

/// The pre-tokeniser's class of a codepoint: 0 other, 1 letter, 2 number, 3 whitespace.
#[no_mangle]
pub extern "C" fn rb_char_class(cp: u32) -> u32 {
    pretok::class_of(cp) as u32
}

/// The Unicode version of the character tables, NUL-terminated.
#[no_mangle]
pub extern "C" fn rb_unicode_version() -> *const u8 {
    static V: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    V.get_or_init(|| [unicode_tables::UNICODE_VERSION.as_bytes(), b"\0"].concat()).as_ptr()
}
