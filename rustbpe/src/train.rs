//! BPE training: stream documents in, count their chunks in parallel, then merge pairs.
//!
//! Counting: each call to `feed` cuts its buffer into documents, repairs invalid UTF-8 (U+FFFD,
//! counted), applies the per-document character cap and the total character limit, then splits
//! the documents over `n_threads` std threads; each thread adds chunk counts into its own table,
//! which lives as long as the trainer, so nothing is shared and nothing is locked.
//!
//! Merging: a chunk is a "word" of token ids with a multiplicity. We keep, per pair, its total
//! count and the words it occurs in, and a max-heap of (count, pair). Counts only ever go down
//! for an existing pair (new occurrences only appear in the merge that creates a token), so heap
//! entries are lazily refreshed: a popped entry whose count is stale is pushed back with its
//! current count. Merging a pair touches only the words that contain it, and the count changes
//! of neighbouring pairs are gathered in dense per-token arrays before touching the pair table.
//!
//! Tie-breaking (deterministic, the same as the PyPI `rustbpe` 0.1.0): the pair with the highest
//! count wins; among equal counts, the smallest pair (left id, then right id) wins. Pair counts
//! are over all adjacent positions (so "aaa" holds (a,a) twice), and a merge rewrites each word
//! left to right without overlaps. New token ids are 256, 257, ... in merge order.

use crate::chunks::ChunkCounts;
use crate::hash::FastMap;
use crate::pretok::{for_each_chunk, is_safe_split};
use std::borrow::Cow;
use std::collections::BinaryHeap;

/// Documents bigger than this are cut at safe chunk boundaries so that threads share the work.
const PIECE_BYTES: usize = 1 << 20;

#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    pub docs: u64,
    pub chars: u64,
    pub bytes: u64,
    pub replaced: u64,    // invalid UTF-8 sequences replaced by U+FFFD
    pub capped_docs: u64, // documents cut to doc_cap characters
    pub limit_reached: u64,
    pub chunks: u64,
    pub unique_chunks: u64,
}

pub struct Trainer {
    n_threads: usize,
    doc_cap: u64,   // 0: no cap
    max_chars: u64, // 0: no limit
    counts: Vec<ChunkCounts>,
    pub stats: Stats,
    trained: bool,
}

pub enum TrainError {
    Aborted,
    AlreadyTrained,
}

impl Trainer {
    pub fn new(n_threads: usize, doc_cap: u64, max_chars: u64) -> Self {
        let n_threads = n_threads.max(1);
        Trainer {
            n_threads,
            doc_cap,
            max_chars,
            counts: (0..n_threads).map(|_| ChunkCounts::default()).collect(),
            stats: Stats::default(),
            trained: false,
        }
    }

    pub fn limit_reached(&self) -> bool {
        self.stats.limit_reached != 0
    }

    /// Counts the chunks of the documents `data[..lens[0]]`, `data[lens[0]..][..lens[1]]`, ...
    /// Once the character limit is reached, `limit_reached()` is true and later documents are ignored.
    pub fn feed(&mut self, data: &[u8], lens: &[u64]) {
        // Sequential pass: repair, cap and limit (cheap, and the limit depends on document order).
        let mut docs: Vec<Cow<str>> = Vec::with_capacity(lens.len());
        let mut off = 0usize;
        for &len in lens {
            if self.limit_reached() {
                break;
            }
            let raw = &data[off..off + len as usize];
            off += len as usize;
            let mut text = match std::str::from_utf8(raw) {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => {
                    self.stats.replaced += raw.utf8_chunks().filter(|c| !c.invalid().is_empty()).count() as u64;
                    Cow::Owned(String::from_utf8_lossy(raw).into_owned())
                }
            };
            let mut nchars = text.chars().count() as u64;
            if self.doc_cap > 0 && nchars > self.doc_cap {
                text = cut_chars(text, self.doc_cap);
                nchars = self.doc_cap;
                self.stats.capped_docs += 1;
            }
            if self.max_chars > 0 && self.stats.chars + nchars >= self.max_chars {
                let keep = self.max_chars - self.stats.chars;
                text = cut_chars(text, keep);
                nchars = keep;
                self.stats.limit_reached = 1;
            }
            self.stats.docs += 1;
            self.stats.chars += nchars;
            self.stats.bytes += text.len() as u64;
            docs.push(text);
        }

        // Pieces of at most ~PIECE_BYTES, then contiguous runs of pieces of equal byte size per thread.
        let mut pieces: Vec<&str> = Vec::with_capacity(docs.len());
        for d in &docs {
            split_pieces(d, &mut pieces);
        }
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let per_thread = total / self.n_threads + 1;
        let mut groups: Vec<&[&str]> = Vec::with_capacity(self.n_threads);
        let (mut start, mut acc) = (0, 0);
        for (k, p) in pieces.iter().enumerate() {
            acc += p.len();
            if acc >= per_thread && groups.len() + 1 < self.n_threads {
                groups.push(&pieces[start..=k]);
                start = k + 1;
                acc = 0;
            }
        }
        groups.push(&pieces[start..]);

        let count_group = |map: &mut ChunkCounts, group: &[&str]| -> u64 {
            let mut n = 0u64;
            for text in group {
                for_each_chunk(text, |chunk| {
                    n += 1;
                    map.add(chunk, 1);
                });
            }
            n
        };
        let n_chunks: u64 = if groups.len() == 1 || total < 64 * 1024 {
            count_group(&mut self.counts[0], &pieces)
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = self
                    .counts
                    .iter_mut()
                    .zip(groups)
                    .map(|(map, group)| scope.spawn(move || count_group(map, group)))
                    .collect();
                handles.into_iter().map(|h| h.join().expect("counting thread panicked")).sum()
            })
        };
        self.stats.chunks += n_chunks;
    }

    /// Learns up to `n_merges` merges. `progress(done, total)` is called every ~1% of the merges
    /// (on this thread) and may return false to stop; the merges so far are then discarded.
    pub fn train(
        &mut self,
        n_merges: u32,
        mut progress: impl FnMut(u32, u64, u64) -> bool,
    ) -> Result<Vec<(u32, u32)>, TrainError> {
        if self.trained {
            return Err(TrainError::AlreadyTrained);
        }
        self.trained = true;
        // Add up the per-thread tables pairwise, in parallel: log2(n_threads) rounds.
        let mut maps = std::mem::take(&mut self.counts);
        while maps.len() > 1 {
            let rest = maps.split_off(maps.len().div_ceil(2));
            std::thread::scope(|scope| {
                for (a, mut b) in maps.iter_mut().zip(rest) {
                    if a.len() < b.len() {
                        std::mem::swap(a, &mut b); // insert the smaller table into the bigger one
                    }
                    scope.spawn(move || a.merge(b));
                }
            });
        }
        let chunks = maps.pop().expect("at least one table");
        self.stats.unique_chunks = chunks.len() as u64;
        if !progress(1, chunks.len() as u64, chunks.len() as u64) {
            return Err(TrainError::Aborted);
        }
        let mut words = Words::default();
        for (chunk, count) in chunks.iter() {
            if chunk.len() >= 2 {
                words.push(chunk, count as i64);
            }
        }
        merge_loop(words, n_merges, |done, total| progress(2, done, total))
    }
}

/// The first `n` characters of `text`.
fn cut_chars(text: Cow<str>, n: u64) -> Cow<str> {
    let end = text.char_indices().nth(n as usize).map_or(text.len(), |(i, _)| i);
    match text {
        Cow::Borrowed(s) => Cow::Borrowed(&s[..end]),
        Cow::Owned(mut s) => {
            s.truncate(end);
            Cow::Owned(s)
        }
    }
}

/// Appends `text` to `out`, cut at safe chunk boundaries into pieces of about PIECE_BYTES.
fn split_pieces<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    let s = text.as_bytes();
    let mut start = 0;
    while s.len() - start > 2 * PIECE_BYTES {
        let mut p = start + PIECE_BYTES;
        while p < s.len() && !is_safe_split(s, p) {
            p += 1;
        }
        out.push(&text[start..p]);
        start = p;
    }
    out.push(&text[start..]);
}

/// All words in one flat u32 array. A word is named by its offset `w`: `flat[w]` is its current
/// length, `flat[w+1..w+3]` its count (low, high), then its token ids. Keeping the header next to
/// the ids means one cache miss per word visited, which is what the merge loop is bound by.
#[derive(Default)]
struct Words {
    flat: Vec<u32>,
}

const HEADER: usize = 3;

impl Words {
    fn push(&mut self, bytes: &[u8], count: i64) {
        assert!(self.flat.len() + HEADER + bytes.len() < u32::MAX as usize, "too many distinct chunks");
        self.flat.extend([bytes.len() as u32, count as u32, (count >> 32) as u32]);
        self.flat.extend(bytes.iter().map(|&b| b as u32));
    }
    /// (offset, length, count) of every word.
    fn iter(&self) -> impl Iterator<Item = (usize, usize, i64)> + '_ {
        let mut w = 0;
        std::iter::from_fn(move || {
            let (len, count) = self.header(w)?;
            let item = (w, len, count);
            w += HEADER + len;
            Some(item)
        })
    }
    #[inline]
    fn header(&self, w: usize) -> Option<(usize, i64)> {
        let h = self.flat.get(w..w + HEADER)?;
        Some((h[0] as usize, h[1] as i64 | (h[2] as i64) << 32))
    }
}

/// Hints the CPU to start loading the cache line at `p` (the merge loop knows its next words).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// What we know about one pair: its total count and (a superset of) the words holding it.
struct PairSlot {
    count: i64,
    words: Vec<u32>,
}

#[inline]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// Pair -> slot index. Byte pairs live in a dense table, the rest in a hash map.
struct PairIndex {
    byte_pairs: Vec<u32>, // 65536 entries, u32::MAX = absent
    other: FastMap<u64, u32>,
    slots: Vec<PairSlot>,
}

impl PairIndex {
    #[inline]
    fn get(&self, a: u32, b: u32) -> Option<u32> {
        if a < 256 && b < 256 {
            let s = self.byte_pairs[(a << 8 | b) as usize];
            (s != u32::MAX).then_some(s)
        } else {
            self.other.get(&key(a, b)).copied()
        }
    }
    #[inline]
    fn get_or_insert(&mut self, a: u32, b: u32) -> u32 {
        if let Some(s) = self.get(a, b) {
            return s;
        }
        let s = self.slots.len() as u32;
        self.slots.push(PairSlot { count: 0, words: Vec::new() });
        if a < 256 && b < 256 {
            self.byte_pairs[(a << 8 | b) as usize] = s;
        } else {
            self.other.insert(key(a, b), s);
        }
        s
    }
}

/// Per-merge scratch: count changes keyed by the neighbouring token, plus which entries are set.
struct Scratch {
    delta: Vec<i64>,
    words: Vec<Vec<u32>>,
    touched: Vec<u32>,
    is_touched: Vec<bool>,
}

impl Scratch {
    fn new(n: usize, with_words: bool) -> Self {
        Scratch {
            delta: vec![0; n],
            words: if with_words { (0..n).map(|_| Vec::new()).collect() } else { Vec::new() },
            touched: Vec::new(),
            is_touched: vec![false; n],
        }
    }
    #[inline]
    fn add(&mut self, t: u32, d: i64) {
        let t = t as usize;
        if !self.is_touched[t] {
            self.is_touched[t] = true;
            self.touched.push(t as u32);
        }
        self.delta[t] += d;
    }
    #[inline]
    fn add_word(&mut self, t: u32, d: i64, w: u32) {
        self.add(t, d);
        let ws = &mut self.words[t as usize];
        if ws.last() != Some(&w) {
            ws.push(w);
        }
    }
}

type HeapEntry = (i64, u64); // (count, !pair so that smaller pairs rank higher)

/// Initial pair counts: every adjacent position of every word, weighted by the word's count.
#[inline(never)]
fn count_byte_pairs(words: &Words) -> PairIndex {
    let mut index = PairIndex { byte_pairs: vec![u32::MAX; 1 << 16], other: FastMap::default(), slots: Vec::new() };
    for (w, ln, cw) in words.iter() {
        let ids = &words.flat[w + HEADER..w + HEADER + ln];
        for k in 0..ln - 1 {
            let s = index.get_or_insert(ids[k], ids[k + 1]) as usize;
            let slot = &mut index.slots[s];
            slot.count += cw;
            if slot.words.last() != Some(&(w as u32)) {
                slot.words.push(w as u32);
            }
        }
    }
    index
}

#[inline(never)]
fn merge_loop(
    mut words: Words,
    n_merges: u32,
    mut progress: impl FnMut(u64, u64) -> bool,
) -> Result<Vec<(u32, u32)>, TrainError> {
    let n_tokens = 256 + n_merges as usize;
    let mut index = count_byte_pairs(&words);
    let mut heap: BinaryHeap<HeapEntry> = (0..1u32 << 16)
        .filter_map(|ab| index.get(ab >> 8, ab & 255).map(|s| (index.slots[s as usize].count, !key(ab >> 8, ab & 255))))
        .collect();

    // Scratch arrays, indexed by the neighbouring token:
    let mut left_old = Scratch::new(n_tokens, false); // (x, a) loses occurrences
    let mut right_old = Scratch::new(n_tokens, false); // (b, y) loses occurrences
    let mut left_new = Scratch::new(n_tokens, true); // (x, z) gains them
    let mut right_new = Scratch::new(n_tokens, true); // (z, y) gains them

    let mut merges: Vec<(u32, u32)> = Vec::with_capacity(n_merges as usize);
    let report_every = (n_merges / 100).max(1);
    while merges.len() < n_merges as usize {
        let Some((count, neg_pair)) = heap.pop() else { break };
        let (a, b) = ((!neg_pair >> 32) as u32, !neg_pair as u32);
        let s = index.get(a, b).expect("every pair in the heap has a slot");
        let current = index.slots[s as usize].count;
        if count != current {
            if current > 0 {
                heap.push((current, neg_pair));
            }
            continue;
        }
        let z = 256 + merges.len() as u32;
        merges.push((a, b));

        let pair_words = std::mem::take(&mut index.slots[s as usize].words);
        index.slots[s as usize].count = 0; // every occurrence is merged below
        for (k, &w) in pair_words.iter().enumerate() {
            if let Some(&next) = pair_words.get(k + 4) {
                prefetch(words.flat.as_ptr().wrapping_add(next as usize));
            }
            let (ln, cw) = words.header(w as usize).expect("a word offset");
            let ids = &mut words.flat[w as usize + HEADER..w as usize + HEADER + ln];
            let (mut r, mut out) = (0, 0);
            while r < ln {
                if r + 1 < ln && ids[r] == a && ids[r + 1] == b {
                    if out > 0 {
                        let x = ids[out - 1];
                        if x == z {
                            right_new.add(a, -cw); // (z, a) was created by the previous merge in this word
                        } else {
                            left_old.add(x, cw);
                        }
                        left_new.add_word(x, cw, w);
                    }
                    if r + 2 < ln {
                        let y = ids[r + 2];
                        right_old.add(y, cw);
                        right_new.add_word(y, cw, w);
                    }
                    ids[out] = z;
                    r += 2;
                } else {
                    ids[out] = ids[r];
                    r += 1;
                }
                out += 1;
            }
            words.flat[w as usize] = out as u32;
        }

        // Existing neighbours lose counts (their heap entries go stale and get refreshed lazily).
        for (scratch, left) in [(&mut left_old, true), (&mut right_old, false)] {
            for &t in &scratch.touched {
                let d = std::mem::take(&mut scratch.delta[t as usize]);
                scratch.is_touched[t as usize] = false;
                let sl = if left { index.get(t, a) } else { index.get(b, t) };
                let sl = sl.expect("a neighbouring pair is always counted") as usize;
                if sl != s as usize {
                    index.slots[sl].count -= d;
                }
            }
            scratch.touched.clear();
        }
        // New pairs with z: registered once, here, with every word they occur in.
        for (scratch, left) in [(&mut left_new, true), (&mut right_new, false)] {
            for &t in &scratch.touched {
                let d = std::mem::take(&mut scratch.delta[t as usize]);
                let ws = std::mem::take(&mut scratch.words[t as usize]);
                scratch.is_touched[t as usize] = false;
                if d > 0 {
                    let (p, q) = if left { (t, z) } else { (z, t) };
                    let sl = index.get_or_insert(p, q);
                    index.slots[sl as usize] = PairSlot { count: d, words: ws };
                    heap.push((d, !key(p, q)));
                }
            }
            scratch.touched.clear();
        }

        let done = merges.len() as u32;
        if done.is_multiple_of(report_every) && !progress(done as u64, n_merges as u64) {
            return Err(TrainError::Aborted);
        }
    }
    // the last report, also when the corpus ran out of pairs early
    if !(merges.len() as u32).is_multiple_of(report_every) && !progress(merges.len() as u64, n_merges as u64) {
        return Err(TrainError::Aborted);
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain algorithm: recount every pair after every merge.
    fn reference(words: &[(&[u8], i64)], n_merges: u32) -> Vec<(u32, u32)> {
        let mut ws: Vec<(Vec<u32>, i64)> = words.iter().map(|(b, c)| (b.iter().map(|&x| x as u32).collect(), *c)).collect();
        let mut merges = Vec::new();
        for m in 0..n_merges {
            let mut counts: std::collections::BTreeMap<(u32, u32), i64> = Default::default();
            for (w, c) in &ws {
                for p in w.windows(2) {
                    *counts.entry((p[0], p[1])).or_default() += c;
                }
            }
            let Some((&best, _)) = counts.iter().max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0))) else { break };
            let z = 256 + m;
            for (w, _) in ws.iter_mut() {
                let mut out = Vec::new();
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && (w[i], w[i + 1]) == best {
                        out.push(z);
                        i += 2;
                    } else {
                        out.push(w[i]);
                        i += 1;
                    }
                }
                *w = out;
            }
            merges.push(best);
        }
        merges
    }

    #[test]
    fn matches_reference_on_repetitive_words() {
        let words: Vec<(&[u8], i64)> = vec![
            (b"aaaaaaa", 3), (b"abababab", 2), (b"aab", 5), (b"baaab", 1), (b"abcabcabc", 4), (b"cccc", 2), (b"xyzzy", 7),
        ];
        let mut w = Words::default();
        for (b, c) in &words {
            w.push(b, *c);
        }
        let got = merge_loop(w, 40, |_, _| true).ok().unwrap();
        assert_eq!(got, reference(&words, 40));
    }

    #[test]
    fn feed_caps_limits_and_repairs() {
        let mut t = Trainer::new(2, 5, 12);
        let docs: [&[u8]; 4] = [b"hello world", b"ab\xffcd", b"xyzxyz", b"never"];
        let data: Vec<u8> = docs.concat();
        let lens: Vec<u64> = docs.iter().map(|d| d.len() as u64).collect();
        t.feed(&data, &lens);
        assert_eq!(t.stats.replaced, 1);
        assert_eq!(t.stats.capped_docs, 2); // "hello world" -> "hello", "xyzxyz" -> "xyzxy"
        assert_eq!(t.stats.chars, 12); // 5 + 5 + 2 (limit)
        assert_eq!(t.stats.docs, 3);
        assert!(t.limit_reached());
    }
}
