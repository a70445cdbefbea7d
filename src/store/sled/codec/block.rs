//! Blocks: many encoded items compressed together with zstd.

use std::cell::RefCell;

use super::{corrupt, CodecError, ENTRY_FORMAT, MAX_BLOCK_BYTES, ZSTD_LEVEL};

/// zstd level for write-ahead-log batches: written once and read back only after a
/// crash, on the commit thread that every acknowledgement waits for, so speed first.
const WAL_ZSTD_LEVEL: i32 = 1;

thread_local! {
    // zstd contexts are costly to make (hundreds of kilobytes each): one per thread.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static WAL_COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// `raw` as one zstd frame appended to `out`, with this thread's compressor for `level`.
fn compress_into(raw: &[u8], level: i32, out: &mut Vec<u8>) {
    let compressor = if level == WAL_ZSTD_LEVEL {
        &WAL_COMPRESSOR
    } else {
        &COMPRESSOR
    };
    // Compressing an in-memory buffer into a Vec only fails on allocation failure.
    let compressed = compressor.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(level).ok();
        }
        c.as_mut()
            .and_then(|c| c.compress(raw).ok())
            .unwrap_or_default()
    });
    out.extend(compressed);
}

/// A write-ahead-log batch, compressed fast, after `out`'s format byte.
pub fn compress_wal(raw: &[u8], out: &mut Vec<u8>) {
    compress_into(raw, WAL_ZSTD_LEVEL, out);
}

/// Compresses encoded items (records or events) into one block.
pub fn encode_block<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut raw = Vec::new();
    for item in items {
        let _ = postcard::to_io(&item.len(), &mut raw);
        raw.extend_from_slice(item);
    }
    let mut out = vec![ENTRY_FORMAT];
    compress_into(&raw, ZSTD_LEVEL, &mut out);
    out
}

/// Decompresses a zstd frame into a buffer of exactly its recorded size.
pub(super) fn decompress(compressed: &[u8]) -> Result<Vec<u8>, CodecError> {
    let size = zstd::zstd_safe::get_frame_content_size(compressed)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n <= MAX_BLOCK_BYTES)
        .ok_or_else(|| corrupt("a block has no valid size"))?;
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        let d = d
            .as_mut()
            .ok_or_else(|| corrupt("no memory for a decompressor"))?;
        d.decompress(compressed, size)
            .map_err(|e| corrupt(format!("a block does not decompress: {e}")))
    })
}

/// A decompressed block: its items, in the order they were written.
#[derive(Debug)]
pub struct Block {
    raw: Vec<u8>,
    items: Vec<std::ops::Range<usize>>,
}

impl Block {
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.items.iter().map(|r| &self.raw[r.clone()])
    }

    pub fn to_vecs(&self) -> Vec<Vec<u8>> {
        self.iter().map(<[u8]>::to_vec).collect()
    }
}

pub fn decode_block(block: &[u8]) -> Result<Block, CodecError> {
    let Some((&ENTRY_FORMAT, compressed)) = block.split_first() else {
        return Err(corrupt("unknown block format"));
    };
    let raw = decompress(compressed)?;
    let mut items = Vec::new();
    let mut at = 0;
    while at < raw.len() {
        let (len, after): (usize, &[u8]) = postcard::take_from_bytes(&raw[at..])?;
        let start = raw.len() - after.len();
        let end = start
            .checked_add(len)
            .filter(|end| *end <= raw.len())
            .ok_or_else(|| corrupt("a block item runs past its block"))?;
        items.push(start..end);
        at = end;
    }
    Ok(Block { raw, items })
}
