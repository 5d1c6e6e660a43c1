//! The pre-tokeniser: GPT-4's split pattern with digit groups of 1-2, written out by hand.
//!
//! ```text
//! '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+
//! ```
//!
//! A regex engine tries the seven alternatives in order at each position and takes the first that
//! matches; `next_end` does the same, one `if` per alternative, with the backtracking of `\s*[\r\n]`
//! and `\s+(?!\S)` resolved in closed form. Every character starts some alternative, so the
//! chunks tile the text. Semantics follow Python's `regex` module: `\s` is Unicode White_Space and
//! `(?i)` is simple case folding, under which the only non-ASCII match is U+017F (long s) for `s`.

use crate::unicode_tables::CLASS_RANGES;

pub const OTHER: u8 = 0;
pub const LETTER: u8 = 1;
pub const NUMBER: u8 = 2;
pub const SPACE: u8 = 3;

/// Classes of the 128 ASCII codepoints, taken from the generated ranges at compile time.
static ASCII_CLASS: [u8; 128] = {
    let mut t = [OTHER; 128];
    let mut i = 0;
    while i < CLASS_RANGES.len() && CLASS_RANGES[i].0 < 128 {
        let (first, last, class) = CLASS_RANGES[i];
        let mut cp = first;
        while cp <= last && cp < 128 {
            t[cp as usize] = class;
            cp += 1;
        }
        i += 1;
    }
    t
};

/// Letter, number, space or other.
#[inline]
pub fn class_of(cp: u32) -> u8 {
    if cp < 128 {
        return ASCII_CLASS[cp as usize];
    }
    let i = CLASS_RANGES.partition_point(|r| r.1 < cp);
    match CLASS_RANGES.get(i) {
        Some(&(first, _, class)) if first <= cp => class,
        _ => OTHER,
    }
}

/// The codepoint starting at byte `i` of valid UTF-8, and its length in bytes.
#[inline]
fn decode(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        let c = ((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F);
        (c, 3)
    } else {
        let c = ((b0 & 0x07) << 18)
            | ((s[i + 1] as u32 & 0x3F) << 12)
            | ((s[i + 2] as u32 & 0x3F) << 6)
            | (s[i + 3] as u32 & 0x3F);
        (c, 4)
    }
}

/// Class of the character at byte `i` and its length; `i` must be < s.len().
#[inline]
fn class_at(s: &[u8], i: usize) -> (u8, usize) {
    if s[i] < 0x80 {
        return (ASCII_CLASS[s[i] as usize], 1);
    }
    let (c, l) = decode(s, i);
    (class_of(c), l)
}

/// End of the run of characters of class `class` starting at byte `i`.
#[inline]
fn run_end(s: &[u8], mut i: usize, class: u8) -> usize {
    while i < s.len() {
        let (c, l) = class_at(s, i);
        if c != class {
            break;
        }
        i += l;
    }
    i
}

/// Simple case folding of the letters that appear in the contractions (0 for anything else).
#[inline]
fn fold(cp: u32) -> u8 {
    match cp {
        0x41..=0x5A => cp as u8 | 0x20,
        0x61..=0x7A => cp as u8,
        0x17F => b's', // LATIN SMALL LETTER LONG S folds to 's'
        _ => 0,
    }
}

/// Byte offset where the chunk starting at byte `i` ends (`i < s.len()`, `s` valid UTF-8).
pub fn next_end(s: &[u8], i: usize) -> usize {
    let n = s.len();
    let (c, l) = decode(s, i);
    let class = class_of(c);

    // 1. '(?i:[sdmt]|ll|ve|re)
    if c == b'\'' as u32 && i + 1 < n {
        let (c2, l2) = decode(s, i + 1);
        match fold(c2) {
            b's' | b'd' | b'm' | b't' => return i + 1 + l2,
            f @ (b'l' | b'v' | b'r') if i + 2 < n => {
                let want = if f == b'l' { b'l' } else { b'e' };
                if s[i + 2] | 0x20 == want {
                    return i + 3;
                }
            }
            _ => {}
        }
    }
    // 2. [^\r\n\p{L}\p{N}]?+\p{L}+   (an optional non-letter, non-number prefix, then letters)
    if class == LETTER {
        return run_end(s, i + l, LETTER);
    }
    if class != NUMBER && c != b'\r' as u32 && c != b'\n' as u32 && i + l < n {
        let (c2, l2) = class_at(s, i + l);
        if c2 == LETTER {
            return run_end(s, i + l + l2, LETTER);
        }
    }
    // 3. \p{N}{1,2}
    if class == NUMBER {
        if i + l < n {
            let (c2, l2) = class_at(s, i + l);
            if c2 == NUMBER {
                return i + l + l2;
            }
        }
        return i + l;
    }
    // 4.  ?[^\s\p{L}\p{N}]++[\r\n]*   (the space is optional but only taken if "other" follows)
    let others_from = if class == OTHER {
        Some(i)
    } else if c == b' ' as u32 && i + 1 < n && class_at(s, i + 1).0 == OTHER {
        Some(i + 1)
    } else {
        None
    };
    if let Some(j) = others_from {
        let mut j = run_end(s, j, OTHER);
        while j < n && (s[j] == b'\r' || s[j] == b'\n') {
            j += 1;
        }
        return j;
    }
    // Here c is whitespace. Scan its maximal run, noting where the last CR/LF in it ends and
    // where the last character of the run starts.
    let (mut j, mut newline_end, mut last_start) = (i, 0, i);
    while j < n {
        let (c2, l2) = decode(s, j);
        if class_of(c2) != SPACE {
            break;
        }
        if c2 == b'\r' as u32 || c2 == b'\n' as u32 {
            newline_end = j + l2;
        }
        last_start = j;
        j += l2;
    }
    // 5. \s*[\r\n]: greedy, then back off to the last CR/LF of the run
    if newline_end > 0 {
        return newline_end;
    }
    // 6. \s+(?!\S): the whole run at the end of the text, else all but its last character
    //    (which then prefixes the next word); 7. \s+: a single space before a non-space
    if j == n || last_start == i {
        return j;
    }
    last_start
}

/// Calls `f` with every chunk of `text`, in order.
#[inline]
pub fn for_each_chunk(text: &str, mut f: impl FnMut(&[u8])) {
    let s = text.as_bytes();
    let mut i = 0;
    while i < s.len() {
        let j = next_end(s, i);
        f(&s[i..j]);
        i = j;
    }
}

/// Whether a chunk boundary is certain at byte `p`: after a LF and before a non-space, every
/// alternative that could contain the LF stops right after it. Lets big documents be split
/// across threads without changing the chunks.
#[inline]
pub fn is_safe_split(s: &[u8], p: usize) -> bool {
    p > 0 && p < s.len() && s[p - 1] == b'\n' && (s[p] & 0xC0) != 0x80 && class_at(s, p).0 != SPACE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(t: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < t.len() {
            let j = next_end(t.as_bytes(), i);
            out.push(&t[i..j]);
            i = j;
        }
        out
    }

    #[test]
    fn gpt4_style_chunks() {
        assert_eq!(split("Hello world"), ["Hello", " world"]);
        assert_eq!(split("I'm don't WE'LL x'ſ 'ſ"), ["I", "'m", " don", "'t", " WE", "'LL", " x", "'ſ", " '", "ſ"]);
        assert_eq!(split("12345 x"), ["12", "34", "5", " x"]);
        assert_eq!(split("a  b\n\n c   "), ["a", " ", " b", "\n\n", " c", "   "]);
        assert_eq!(split("(foo)!!\r\n\tbar"), ["(foo", ")!!\r\n", "\tbar"]);
        assert_eq!(split("x \u{3000}y"), ["x", " ", "\u{3000}y"]);
    }

    #[test]
    fn classes() {
        assert_eq!(class_of('a' as u32), LETTER);
        assert_eq!(class_of('中' as u32), LETTER);
        assert_eq!(class_of('٣' as u32), NUMBER);
        assert_eq!(class_of(0x2028), SPACE);
        assert_eq!(class_of(0x1F600), OTHER);
        assert_eq!(class_of(0x1C), OTHER); // isspace() but not White_Space
    }
}
