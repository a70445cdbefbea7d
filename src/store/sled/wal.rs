//! The write-ahead log: where an event is durable before verigate acknowledges it.
//!
//! A log is a folder of segment files, each named by the first sequence number it may
//! hold. A segment is an 8-byte header followed by records `[u32 length][u32 crc32]
//! [payload]`, little-endian; one record is one commit batch, so a batch is replayed whole
//! or not at all. A crash can only tear the last record of the last segment: replay stops
//! at the first record that is short or fails its checksum. After any write error the
//! segment is cut back to its last good record and a new segment is started, so a record
//! that may have reached the disk after a failed `fsync` is never followed by good ones.
//!
//! Segments whose events are all checkpointed into the index are deleted.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

const HEADER: &[u8; 8] = b"VGWAL\0\0\x01";
const FRAME: usize = 8;
/// Largest record accepted on replay; larger means a damaged length field.
const MAX_RECORD: usize = 256 << 20;
const SUFFIX: &str = "wal";

/// The segment being written.
pub struct WalWriter {
    dir: PathBuf,
    file: File,
    /// Bytes of the segment known to be good (durable after the last successful sync).
    len: u64,
    frame: Vec<u8>,
}

impl WalWriter {
    /// Starts a new segment for events from `first_seq` on.
    pub fn create(dir: &Path, first_seq: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = segment_path(dir, first_seq);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        file.write_all(HEADER)?;
        file.sync_all()?;
        // The new name must survive a crash too.
        sync_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            file,
            len: HEADER.len() as u64,
            frame: Vec::new(),
        })
    }

    /// Appends one record and makes it durable. On error the segment is cut back to its
    /// last good record; the caller starts a new segment before writing again.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "log record too large"))?;
        self.frame.clear();
        self.frame.extend_from_slice(&len.to_le_bytes());
        self.frame
            .extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        self.frame.extend_from_slice(payload);
        let written = self
            .file
            .write_all(&self.frame)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += self.frame.len() as u64;
                Ok(())
            }
            Err(err) => {
                // Best effort: a full disk can still shrink a file.
                let _ = self.file.set_len(self.len);
                let _ = self.file.sync_all();
                Err(err)
            }
        }
    }

    /// Closes this segment and starts the next one at `first_seq`.
    pub fn rotate(&mut self, first_seq: u64) -> io::Result<()> {
        *self = Self::create(&self.dir, first_seq)?;
        Ok(())
    }
}

/// How reading a segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentEnd {
    /// Every byte was a good record.
    Clean,
    /// Bytes from this offset on are not a whole, intact record (a torn write).
    Torn { at: u64 },
}

/// The segments in `dir`, oldest first, by their first sequence number.
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(err) => return Err(err),
    };
    for entry in entries {
        let path = entry?.path();
        let first = path
            .extension()
            .filter(|e| *e == SUFFIX)
            .and_then(|_| path.file_stem())
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(first) = first {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every intact record of a segment, in order.
pub fn read_segment(path: &Path, mut record: impl FnMut(&[u8])) -> io::Result<SegmentEnd> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    if bytes.len() < HEADER.len() || &bytes[..HEADER.len()] != HEADER {
        return Ok(SegmentEnd::Torn { at: 0 });
    }
    let mut at = HEADER.len();
    while at < bytes.len() {
        let Some(frame) = bytes.get(at..at + FRAME) else {
            return Ok(SegmentEnd::Torn { at: at as u64 });
        };
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        let payload = (len <= MAX_RECORD)
            .then(|| bytes.get(at + FRAME..at + FRAME + len))
            .flatten();
        match payload {
            Some(payload) if crc32fast::hash(payload) == crc => record(payload),
            _ => return Ok(SegmentEnd::Torn { at: at as u64 }),
        }
        at += FRAME + len;
    }
    Ok(SegmentEnd::Clean)
}

/// Deletes every segment all of whose events have a sequence number up to `checkpoint`,
/// never the newest one (it is being written). A segment ends where the next one begins.
pub fn delete_checkpointed(dir: &Path, checkpoint: u64) -> io::Result<usize> {
    let segments = segments(dir)?;
    let mut deleted = 0;
    for pair in segments.windows(2) {
        let (_, path) = &pair[0];
        let (next_first, _) = pair[1];
        if next_first <= checkpoint.saturating_add(1) {
            fs::remove_file(path)?;
            deleted += 1;
        }
    }
    if deleted > 0 {
        sync_dir(dir)?;
    }
    Ok(deleted)
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.{SUFFIX}"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Checks that the log's disk takes writes again: writes and syncs `bytes` to a probe file.
pub fn probe(dir: &Path, bytes: usize) -> io::Result<()> {
    let path = dir.join("probe.tmp");
    let result = (|| {
        let mut file = File::create(&path)?;
        file.write_all(&vec![0u8; bytes])?;
        file.sync_all()
    })();
    let _ = fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(path: &Path) -> (Vec<Vec<u8>>, SegmentEnd) {
        let mut out = Vec::new();
        let end = read_segment(path, |r| out.push(r.to_vec())).unwrap();
        (out, end)
    }

    #[test]
    fn records_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = WalWriter::create(dir.path(), 1).unwrap();
        for i in 0..5u8 {
            wal.append(&vec![i; 100 + usize::from(i)]).unwrap();
        }
        let segs = segments(dir.path()).unwrap();
        assert_eq!(segs.len(), 1);
        let (read, end) = records(&segs[0].1);
        assert_eq!(end, SegmentEnd::Clean);
        assert_eq!(read.len(), 5);
        assert_eq!(read[3], vec![3u8; 103]);
    }

    #[test]
    fn a_torn_last_record_is_ignored_at_every_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = WalWriter::create(dir.path(), 1).unwrap();
        wal.append(b"first batch").unwrap();
        wal.append(b"second batch").unwrap();
        let path = segments(dir.path()).unwrap()[0].1.clone();
        let whole = fs::read(&path).unwrap();
        let second_starts = HEADER.len() + FRAME + b"first batch".len();
        for cut in second_starts + 1..whole.len() {
            fs::write(&path, &whole[..cut]).unwrap();
            let (read, end) = records(&path);
            assert_eq!(read, vec![b"first batch".to_vec()], "cut at {cut}");
            assert_eq!(
                end,
                SegmentEnd::Torn {
                    at: second_starts as u64
                },
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_damaged_record_stops_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = WalWriter::create(dir.path(), 1).unwrap();
        for batch in [&b"one"[..], b"two", b"three"] {
            wal.append(batch).unwrap();
        }
        let path = segments(dir.path()).unwrap()[0].1.clone();
        let mut bytes = fs::read(&path).unwrap();
        let second_payload = HEADER.len() + FRAME + 3 + FRAME;
        bytes[second_payload] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let (read, end) = records(&path);
        assert_eq!(read, vec![b"one".to_vec()]);
        assert!(matches!(end, SegmentEnd::Torn { .. }));
    }

    #[test]
    fn checkpointed_segments_are_deleted_but_never_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = WalWriter::create(dir.path(), 1).unwrap();
        wal.append(b"1..10").unwrap();
        wal.rotate(11).unwrap();
        wal.append(b"11..20").unwrap();
        wal.rotate(21).unwrap();
        assert_eq!(delete_checkpointed(dir.path(), 9).unwrap(), 0);
        assert_eq!(delete_checkpointed(dir.path(), 10).unwrap(), 1);
        assert_eq!(delete_checkpointed(dir.path(), 1_000).unwrap(), 1);
        let left: Vec<u64> = segments(dir.path()).unwrap().iter().map(|s| s.0).collect();
        assert_eq!(left, [21]);
    }
}
