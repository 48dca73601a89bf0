//! Masks as COCO's uncompressed run-length encoding: `{"size": [height, width], "counts": […]}`,
//! runs of alternating background and foreground pixels in column-major order (down the first
//! column, then the next), starting with background (a mask whose first pixel is set starts
//! with a zero-length run). It is the form `pycocotools.mask` reads, so an export carries a mask
//! as it was painted, and the form agreement compares regions in: a box and a polygon are
//! rasterized to it ([`Rle::from_columns`]) and any two regions intersect by walking their runs.

use serde::{Deserialize, Serialize};

/// A mask over an image of `size = [height, width]` pixels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rle {
    pub size: [u32; 2],
    pub counts: Vec<u32>,
}

/// Why a mask does not fit its image.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RleError {
    #[error("the mask is {found_w}×{found_h} pixels; the image is {width}×{height}")]
    WrongSize { width: u32, height: u32, found_w: u32, found_h: u32 },
    #[error("the runs cover {covered} pixels; the image has {expected}")]
    WrongLength { covered: u64, expected: u64 },
    #[error("compressed counts: {0}")]
    Compressed(&'static str),
}

impl Rle {
    pub fn height(&self) -> u32 {
        self.size[0]
    }

    pub fn width(&self) -> u32 {
        self.size[1]
    }

    /// Checks that the mask is of a `width × height` image and its runs cover it exactly.
    pub fn check(&self, width: u32, height: u32) -> Result<(), RleError> {
        if self.width() != width || self.height() != height {
            return Err(RleError::WrongSize { width, height, found_w: self.width(), found_h: self.height() });
        }
        let covered: u64 = self.counts.iter().map(|&c| u64::from(c)).sum();
        let expected = u64::from(width) * u64::from(height);
        if covered != expected {
            return Err(RleError::WrongLength { covered, expected });
        }
        Ok(())
    }

    /// Pixels set.
    pub fn area(&self) -> u64 {
        self.counts.iter().skip(1).step_by(2).map(|&c| u64::from(c)).sum()
    }

    /// Pixels set in both masks (of the same image; a mask of another size shares none).
    pub fn intersection(&self, other: &Rle) -> u64 {
        if self.size != other.size {
            return 0;
        }
        let (mut a, mut b) = (Runs::new(&self.counts), Runs::new(&other.counts));
        let mut both = 0u64;
        while let (Some((a_left, a_set)), Some((b_left, b_set))) = (a.peek(), b.peek()) {
            let step = a_left.min(b_left);
            if a_set && b_set {
                both += step;
            }
            a.advance(step);
            b.advance(step);
        }
        both
    }

    /// Intersection over union; two empty masks are the same region (1.0).
    pub fn iou(&self, other: &Rle) -> f64 {
        let both = self.intersection(other);
        let union = self.area() + other.area() - both;
        if union == 0 {
            1.0
        } else {
            both as f64 / union as f64
        }
    }

    /// A mask from each column's set rows: `columns(x)` gives column `x`'s row ranges
    /// `[start, end)`, sorted, disjoint, within the height. Only columns in `xs` are asked.
    pub fn from_columns(width: u32, height: u32, xs: std::ops::Range<u32>, mut columns: impl FnMut(u32) -> Vec<(u32, u32)>) -> Rle {
        let mut writer = RunWriter::default();
        let h = u64::from(height);
        for x in xs.start.min(width)..xs.end.min(width) {
            for (start, end) in columns(x) {
                let (start, end) = (u64::from(start.min(height)), u64::from(end.min(height)));
                if end > start {
                    writer.set(u64::from(x) * h + start, end - start);
                }
            }
        }
        writer.finish(u64::from(width) * h, [height, width])
    }

    /// A mask from a row-major bitmap of `width × height` (`true` = set), as a canvas holds it.
    pub fn from_row_major(width: u32, height: u32, pixels: &[bool]) -> Rle {
        Rle::from_columns(width, height, 0..width, |x| {
            let mut rows = Vec::new();
            let mut start = None;
            for y in 0..height {
                let set = pixels.get((y as usize) * (width as usize) + x as usize).copied().unwrap_or(false);
                match (set, start) {
                    (true, None) => start = Some(y),
                    (false, Some(s)) => {
                        rows.push((s, y));
                        start = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = start {
                rows.push((s, height));
            }
            rows
        })
    }

    /// Whether pixel `(x, y)` is set (a walk of the runs: for tests and single lookups).
    pub fn get(&self, x: u32, y: u32) -> bool {
        let index = u64::from(x) * u64::from(self.height()) + u64::from(y);
        let mut at = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            at += u64::from(c);
            if index < at {
                return i % 2 == 1;
            }
        }
        false
    }

    /// The tightest box around the set pixels as `(x, y, w, h)`; `None` for an empty mask.
    pub fn bounds(&self) -> Option<(u32, u32, u32, u32)> {
        let h = u64::from(self.height()).max(1);
        let (mut x0, mut y0, mut x1, mut y1) = (u64::MAX, u64::MAX, 0, 0);
        let mut at = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            let (start, len) = (at, u64::from(c));
            at += len;
            if i % 2 == 0 || len == 0 {
                continue;
            }
            let (first, last) = (start, start + len - 1);
            let (fx, lx) = (first / h, last / h);
            x0 = x0.min(fx);
            x1 = x1.max(lx);
            if fx == lx {
                y0 = y0.min(first % h);
                y1 = y1.max(last % h);
            } else {
                // A run that crosses into the next column covers the end of one column and the
                // start of the next: every row.
                y0 = 0;
                y1 = h - 1;
            }
        }
        (x0 != u64::MAX).then(|| (x0 as u32, y0 as u32, (x1 - x0 + 1) as u32, (y1 - y0 + 1) as u32))
    }
}

/// COCO's compressed counts (the string form `pycocotools.mask.encode` writes): each count in
/// 5-bit groups, least significant first, as characters from `'0'` (48), `0x20` meaning "more
/// follows" and `0x10` of the last group its sign; from the fourth count on, each is stored as
/// the difference from the count two before it (runs of one kind vary slowly).
pub fn decode_compressed(text: &str) -> Result<Vec<u32>, RleError> {
    let bytes = text.as_bytes();
    let mut counts: Vec<u32> = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let mut value: i64 = 0;
        let mut group = 0u32;
        loop {
            let byte = *bytes.get(at).ok_or(RleError::Compressed("ends inside a count"))?;
            let digit = i64::from(byte.checked_sub(48).filter(|d| *d < 64).ok_or(RleError::Compressed("a character outside '0'..'o'"))?);
            if group >= 7 {
                return Err(RleError::Compressed("a count of more than 35 bits"));
            }
            value |= (digit & 0x1f) << (5 * group);
            at += 1;
            group += 1;
            if digit & 0x20 == 0 {
                if digit & 0x10 != 0 {
                    value |= -1i64 << (5 * group);
                }
                break;
            }
        }
        if counts.len() > 2 {
            value += i64::from(counts[counts.len() - 2]);
        }
        counts.push(u32::try_from(value).map_err(|_| RleError::Compressed("a count outside 0..2^32"))?);
    }
    Ok(counts)
}

/// The compressed string of `counts` ([`decode_compressed`] reads it back).
pub fn encode_compressed(counts: &[u32]) -> String {
    let mut out = String::new();
    for (i, &count) in counts.iter().enumerate() {
        let mut value = i64::from(count);
        if i > 2 {
            value -= i64::from(counts[i - 2]);
        }
        loop {
            let mut digit = value & 0x1f;
            value >>= 5;
            let more = if digit & 0x10 != 0 { value != -1 } else { value != 0 };
            if more {
                digit |= 0x20;
            }
            out.push(char::from((digit + 48) as u8));
            if !more {
                break;
            }
        }
    }
    out
}

/// Reads runs one pixel span at a time.
struct Runs<'a> {
    counts: &'a [u32],
    index: usize,
    left: u64,
}

impl<'a> Runs<'a> {
    fn new(counts: &'a [u32]) -> Runs<'a> {
        let mut runs = Runs { counts, index: 0, left: counts.first().map_or(0, |&c| u64::from(c)) };
        runs.skip_empty();
        runs
    }

    fn skip_empty(&mut self) {
        while self.left == 0 && self.index < self.counts.len() {
            self.index += 1;
            self.left = self.counts.get(self.index).map_or(0, |&c| u64::from(c));
        }
    }

    /// Pixels left in the current run and whether they are set.
    fn peek(&self) -> Option<(u64, bool)> {
        (self.index < self.counts.len()).then_some((self.left, self.index % 2 == 1))
    }

    fn advance(&mut self, n: u64) {
        self.left -= n;
        self.skip_empty();
    }
}

/// Builds counts from set spans given in increasing order.
#[derive(Default)]
struct RunWriter {
    counts: Vec<u32>,
    /// The first pixel not yet written.
    at: u64,
}

impl RunWriter {
    fn set(&mut self, start: u64, len: u64) {
        let gap = start.saturating_sub(self.at);
        if gap == 0 && !self.counts.is_empty() && self.counts.len().is_multiple_of(2) {
            // Continues the foreground run just written.
            if let Some(last) = self.counts.last_mut() {
                *last += len as u32;
            }
        } else {
            self.counts.push(gap as u32);
            self.counts.push(len as u32);
        }
        self.at = start + len;
    }

    fn finish(mut self, total: u64, size: [u32; 2]) -> Rle {
        if total > self.at || self.counts.is_empty() {
            self.counts.push((total - self.at.min(total)) as u32);
        }
        Rle { size, counts: self.counts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(width: u32, height: u32, set: &[(u32, u32)]) -> Vec<bool> {
        let mut pixels = vec![false; (width * height) as usize];
        for &(x, y) in set {
            pixels[(y * width + x) as usize] = true;
        }
        pixels
    }

    #[test]
    fn runs_are_column_major_and_start_with_background() {
        // 3 wide, 2 high; set (0,0) and (1,1): column-major order is (0,0) (0,1) (1,0) (1,1) (2,0) (2,1).
        let rle = Rle::from_row_major(3, 2, &bitmap(3, 2, &[(0, 0), (1, 1)]));
        assert_eq!(rle, Rle { size: [2, 3], counts: vec![0, 1, 2, 1, 2] });
        assert_eq!(rle.area(), 2);
        assert!(rle.get(0, 0) && rle.get(1, 1) && !rle.get(1, 0) && !rle.get(2, 1));
        rle.check(3, 2).expect("fits");
    }

    #[test]
    fn an_empty_mask_is_one_background_run() {
        let rle = Rle::from_row_major(4, 4, &[false; 16]);
        assert_eq!(rle.counts, vec![16]);
        assert_eq!(rle.area(), 0);
        assert_eq!(rle.bounds(), None);
    }

    #[test]
    fn adjacent_columns_merge_into_one_run() {
        // Whole columns 1 and 2 of a 4×2 image: one run of 4 pixels.
        let rle = Rle::from_row_major(4, 2, &bitmap(4, 2, &[(1, 0), (1, 1), (2, 0), (2, 1)]));
        assert_eq!(rle.counts, vec![2, 4, 2]);
        assert_eq!(rle.bounds(), Some((1, 0, 2, 2)));
    }

    #[test]
    fn intersection_walks_both_masks() {
        let a = Rle::from_row_major(4, 4, &bitmap(4, 4, &[(0, 0), (1, 1), (2, 2), (3, 3)]));
        let b = Rle::from_row_major(4, 4, &bitmap(4, 4, &[(1, 1), (2, 2), (0, 3)]));
        assert_eq!(a.intersection(&b), 2);
        assert!((a.iou(&b) - 2.0 / 5.0).abs() < 1e-12);
        assert_eq!(a.intersection(&a), 4);
    }

    #[test]
    fn a_mask_of_another_size_is_refused() {
        let rle = Rle { size: [2, 3], counts: vec![6] };
        assert_eq!(rle.check(3, 3), Err(RleError::WrongSize { width: 3, height: 3, found_w: 3, found_h: 2 }));
        let short = Rle { size: [2, 3], counts: vec![2, 1] };
        assert_eq!(short.check(3, 2), Err(RleError::WrongLength { covered: 3, expected: 6 }));
    }

    #[test]
    fn bounds_cover_runs_that_cross_columns() {
        // 3×3, set (0,2) and (1,0): one run crossing from column 0 into column 1.
        let rle = Rle::from_row_major(3, 3, &bitmap(3, 3, &[(0, 2), (1, 0)]));
        assert_eq!(rle.counts, vec![2, 2, 5]);
        assert_eq!(rle.bounds(), Some((0, 0, 2, 3)));
    }

    /// `pycocotools.mask.encode` (2.0.11) of a 70×40 mask: rows 5..30 of columns 3..50, the
    /// pixels `(3y mod 70, y)` and all of column 66.
    const GOLDEN_COMPRESSED: &str = "01W30YM0Ch0<000MXOFh0=000NXODh0>000O11O00000000000001OO1000BXO<h02000CXO:h03000DXO8h04000EXO6h05000FXO4h06000GXO2h07000HXO0h08000IXONh09000JXOLh0:0d1XOe10000000ZOW15iNYM";
    const GOLDEN_COUNTS: [u32; 137] = [
        0, 1, 103, 1, 16, 1, 3, 25, 15, 25, 15, 25, 12, 1, 2, 25, 15, 25, 15, 25, 13, 1, 1, 25, 15, 25, 15, 25, 14, 26, 15, 25, 15, 25, 15, 25, 15, 25, 15, 25,
        15, 25, 15, 25, 15, 26, 14, 25, 15, 25, 15, 25, 1, 1, 13, 25, 15, 25, 15, 25, 2, 1, 12, 25, 15, 25, 15, 25, 3, 1, 11, 25, 15, 25, 15, 25, 4, 1, 10, 25,
        15, 25, 15, 25, 5, 1, 9, 25, 15, 25, 15, 25, 6, 1, 8, 25, 15, 25, 15, 25, 7, 1, 7, 25, 15, 25, 15, 25, 8, 1, 6, 25, 15, 25, 15, 25, 9, 1, 5, 25, 15,
        25, 67, 1, 120, 1, 120, 1, 120, 1, 120, 1, 98, 40, 103, 1, 16,
    ];

    #[test]
    fn compressed_counts_read_what_pycocotools_writes() {
        let counts = decode_compressed(GOLDEN_COMPRESSED).expect("decodes");
        assert_eq!(counts, GOLDEN_COUNTS);
        assert_eq!(encode_compressed(&counts), GOLDEN_COMPRESSED);
        let rle = Rle { size: [40, 70], counts };
        rle.check(70, 40).expect("covers the image");
        assert!(rle.get(3, 5) && rle.get(49, 29) && !rle.get(50, 29) && rle.get(66, 0) && rle.get(9, 3));
    }

    #[test]
    fn broken_compressed_counts_are_refused() {
        assert_eq!(decode_compressed("1Q"), Err(RleError::Compressed("ends inside a count")), "0x21: more follows, then nothing");
        assert_eq!(decode_compressed("0 "), Err(RleError::Compressed("a character outside '0'..'o'")));
        assert_eq!(decode_compressed("@"), Err(RleError::Compressed("a count outside 0..2^32")), "0x10 alone is -16");
        assert!(decode_compressed("QQQQQQQQ0").is_err(), "too long a count");
    }

    proptest::proptest! {
        #[test]
        fn compressed_counts_round_trip(counts in proptest::collection::vec(0u32..5_000_000, 0..40)) {
            let text = encode_compressed(&counts);
            proptest::prop_assert_eq!(decode_compressed(&text).expect("decodes"), counts);
        }

        #[test]
        fn rle_round_trips_any_bitmap(width in 1u32..12, height in 1u32..12, seed in proptest::collection::vec(proptest::bool::ANY, 144)) {
            let pixels: Vec<bool> = seed.into_iter().take((width * height) as usize).chain(std::iter::repeat(false)).take((width * height) as usize).collect();
            let rle = Rle::from_row_major(width, height, &pixels);
            rle.check(width, height).expect("covers the image");
            for y in 0..height {
                for x in 0..width {
                    proptest::prop_assert_eq!(rle.get(x, y), pixels[(y * width + x) as usize]);
                }
            }
            proptest::prop_assert_eq!(rle.area(), pixels.iter().filter(|p| **p).count() as u64);
            proptest::prop_assert_eq!(rle.intersection(&rle), rle.area());
        }
    }
}
