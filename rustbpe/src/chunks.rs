//! The chunk counter: an open-addressing hash table from chunk bytes to a count, built for the
//! hot loop of training (one lookup per chunk of text, ~1 per 5 characters).
//!
//! Most chunks are short words, so keys of up to 16 bytes are stored inside the 32-byte entry and
//! compared as one u128: a lookup touches a single cache line. Longer keys live in an arena.
//! (A std HashMap<Box<[u8]>, _> chases a pointer per lookup and was ~3x slower here.)

const INLINE: usize = 16;

#[derive(Clone, Copy, Default)]
struct Entry {
    hash: u32,
    len: u32, // 0: empty slot (chunks are never empty)
    count: u64,
    key: [u8; INLINE], // the bytes (zero padded), or the arena offset in the first 8 bytes
}

pub struct ChunkCounts {
    entries: Vec<Entry>,
    mask: usize,
    used: usize,
    arena: Vec<u8>,
}

#[inline]
fn pad(chunk: &[u8]) -> [u8; INLINE] {
    let mut k = [0u8; INLINE];
    k[..chunk.len()].copy_from_slice(chunk);
    k
}

#[inline]
fn mix(h: u64, w: u64) -> u64 {
    (h.rotate_left(23) ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// 64-bit hash of a chunk: its length and its bytes in 8-byte words, then a murmur3 finaliser.
#[inline]
fn hash_chunk(chunk: &[u8]) -> u64 {
    let mut h = mix(0, chunk.len() as u64);
    if chunk.len() <= INLINE {
        let k = pad(chunk);
        h = mix(h, u64::from_le_bytes(k[..8].try_into().unwrap()));
        h = mix(h, u64::from_le_bytes(k[8..].try_into().unwrap()));
    } else {
        let mut words = chunk.chunks_exact(8);
        for w in &mut words {
            h = mix(h, u64::from_le_bytes(w.try_into().unwrap()));
        }
        let mut last = [0u8; 8];
        last[..words.remainder().len()].copy_from_slice(words.remainder());
        h = mix(h, u64::from_le_bytes(last));
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

impl Default for ChunkCounts {
    fn default() -> Self {
        Self::with_capacity_pow2(1 << 12)
    }
}

impl ChunkCounts {
    fn with_capacity_pow2(n: usize) -> Self {
        ChunkCounts { entries: vec![Entry::default(); n], mask: n - 1, used: 0, arena: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.used
    }

    fn key_of<'a>(&'a self, e: &'a Entry) -> &'a [u8] {
        let len = e.len as usize;
        if len <= INLINE {
            &e.key[..len]
        } else {
            let off = u64::from_le_bytes(e.key[..8].try_into().unwrap()) as usize;
            &self.arena[off..off + len]
        }
    }

    /// Adds `n` to the count of `chunk` (non-empty).
    #[inline]
    pub fn add(&mut self, chunk: &[u8], n: u64) {
        self.add_hashed(chunk, hash_chunk(chunk) as u32, n)
    }

    #[inline]
    fn add_hashed(&mut self, chunk: &[u8], hash: u32, n: u64) {
        let len = chunk.len();
        let short = if len <= INLINE { Some(u128::from_le_bytes(pad(chunk))) } else { None };
        let mut i = hash as usize & self.mask;
        loop {
            let e = &self.entries[i];
            if e.len == 0 {
                break;
            }
            if e.hash == hash && e.len as usize == len {
                let same = match short {
                    Some(k) => u128::from_le_bytes(e.key) == k,
                    None => self.key_of(e) == chunk,
                };
                if same {
                    self.entries[i].count += n;
                    return;
                }
            }
            i = (i + 1) & self.mask;
        }
        // not found: insert at the empty slot i
        let key = if short.is_some() {
            pad(chunk)
        } else {
            let mut k = [0u8; INLINE];
            k[..8].copy_from_slice(&(self.arena.len() as u64).to_le_bytes());
            self.arena.extend_from_slice(chunk);
            k
        };
        self.entries[i] = Entry { hash, len: len as u32, count: n, key };
        self.used += 1;
        if self.used * 4 > self.entries.len() * 3 {
            self.grow();
        }
    }

    fn grow(&mut self) {
        let old = std::mem::take(&mut self.entries);
        self.entries = vec![Entry::default(); old.len() * 2];
        self.mask = self.entries.len() - 1;
        for e in old.into_iter().filter(|e| e.len != 0) {
            let mut i = e.hash as usize & self.mask;
            while self.entries[i].len != 0 {
                i = (i + 1) & self.mask;
            }
            self.entries[i] = e;
        }
    }

    /// Adds all counts of `other` into `self`.
    pub fn merge(&mut self, other: ChunkCounts) {
        for e in other.entries.iter().filter(|e| e.len != 0) {
            self.add_hashed(other.key_of(e), e.hash, e.count);
        }
    }

    /// Every (chunk, count).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], u64)> {
        self.entries.iter().filter(|e| e.len != 0).map(|e| (self.key_of(e), e.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_short_and_long_keys_and_merges() {
        let long = "x".repeat(40);
        let mut a = ChunkCounts::default();
        let mut b = ChunkCounts::default();
        for i in 0..10_000u32 {
            a.add(format!("w{}", i % 3000).as_bytes(), 1);
            b.add(long.as_bytes(), 2);
        }
        b.add(b"w7", 5);
        a.merge(b);
        assert_eq!(a.len(), 3001);
        let m: std::collections::HashMap<Vec<u8>, u64> = a.iter().map(|(k, c)| (k.to_vec(), c)).collect();
        assert_eq!(m[long.as_bytes()], 20_000);
        assert_eq!(m[&b"w7"[..]], 4 + 5); // 10_000 / 3000 -> 3 or 4 times each
        assert_eq!(m[&b"w2999"[..]], 3);
    }
}
