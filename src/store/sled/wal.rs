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
//!
//! Segments are made ahead of need by the [`SegmentPreparer`], [`SEGMENT_BYTES`] each:
//! header written, the rest zero-filled and synced, so that a commit writes over blocks
//! the file already has and its sync writes the data alone. (Appending also changes the
//! file's size, which every sync must then write too: a second I/O per commit, and the
//! slowest syncs.) A batch that would not fit goes to the next prepared segment. The
//! zeros after the last record read as the segment's clean end; a closed segment is cut
//! back to its records.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

const HEADER: &[u8; 8] = b"VGWAL\0\0\x01";
const FRAME: usize = 8;
/// Largest record accepted on replay; larger means a damaged length field.
const MAX_RECORD: usize = 256 << 20;
const SUFFIX: &str = "wal";
/// The prepared next segment: not a segment's name, so replay never reads it.
const SPARE: &str = "next-segment.tmp";
/// The size of a prepared segment: small, since a prepared segment takes its whole size
/// on disk from the start (and so does the one prepared next).
pub const SEGMENT_BYTES: u64 = 512 << 10;
/// Free space below which no segment is prepared.
const SPARE_ROOM: u64 = 8 * SEGMENT_BYTES;
/// A failure to prepare a segment is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// The preparer's nice value: it works ahead of need, never on a commit's path.
const PREPARER_NICE: i32 = 10;

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
        Self::started(dir, file)
    }

    /// Starts writing a named segment file after its header.
    fn started(dir: &Path, file: File) -> io::Result<Self> {
        // The name must survive a crash before anything in the segment is acknowledged.
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

    /// Starts the segment for events from `first_seq` on in a prepared file.
    fn from_spare(dir: &Path, file: File, first_seq: u64) -> io::Result<Self> {
        fs::rename(dir.join(SPARE), segment_path(dir, first_seq))?;
        Self::started(dir, file)
    }

    /// Whether a record of `payload_len` bytes should go to a new segment: it would pass
    /// the end of a prepared one (or make this one larger than one).
    pub fn is_full_for(&self, payload_len: usize) -> bool {
        self.len > HEADER.len() as u64 && self.len + (FRAME + payload_len) as u64 > SEGMENT_BYTES
    }

    /// Closes this segment and starts the next one at `first_seq`, in `spare` when one
    /// is ready.
    pub fn rotate(&mut self, first_seq: u64, spare: Option<File>) -> io::Result<()> {
        *self = match spare {
            Some(file) => Self::from_spare(&self.dir, file, first_seq)?,
            None => Self::create(&self.dir, first_seq)?,
        };
        Ok(())
    }
}

impl Drop for WalWriter {
    /// Cuts off the zeros of a prepared segment (and anything a failed write left), so a
    /// closed segment takes only the disk its records need.
    fn drop(&mut self) {
        let _ = self.file.set_len(self.len);
    }
}

/// Prepares the next segment on a thread of its own while the current one is written.
pub struct SegmentPreparer {
    dir: PathBuf,
    ready: Arc<Mutex<Option<File>>>,
    asks: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SegmentPreparer {
    /// Starts the preparer for the log in `dir` and prepares a first segment. Without a
    /// thread (the system refused one) segments are simply made when needed.
    pub fn start(dir: &Path) -> Self {
        // A spare left by a crash is never a segment: start afresh.
        let _ = fs::remove_file(dir.join(SPARE));
        let ready = Arc::new(Mutex::new(None));
        let (asks, wanted) = mpsc::channel();
        let thread = {
            let (dir, ready) = (dir.to_owned(), Arc::clone(&ready));
            std::thread::Builder::new()
                .name("verigate-wal-prepare".into())
                .spawn(move || prepare_when_asked(&dir, &ready, &wanted))
                .ok()
        };
        let preparer = Self {
            dir: dir.to_owned(),
            ready,
            asks: thread.is_some().then_some(asks),
            thread,
        };
        preparer.ask();
        preparer
    }

    /// Asks for the next segment to be prepared (after one was taken).
    pub fn ask(&self) {
        if let Some(asks) = &self.asks {
            let _ = asks.send(());
        }
    }

    /// The prepared segment, if one is ready.
    pub fn take(&self) -> Option<File> {
        self.slot().take()
    }

    /// Deletes a prepared segment, giving its space back (the disk is full).
    pub fn discard(&self) {
        if self.take().is_some() {
            let _ = fs::remove_file(self.dir.join(SPARE));
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<File>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for SegmentPreparer {
    /// Stops the thread and deletes an unused prepared segment: a stopped store leaves none.
    fn drop(&mut self) {
        self.asks = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.discard();
    }
}

fn prepare_when_asked(dir: &Path, ready: &Mutex<Option<File>>, asks: &mpsc::Receiver<()>) {
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), PREPARER_NICE);
    let mut warned: Option<Instant> = None;
    while asks.recv().is_ok() {
        // One prepared segment at a time, and never one that would take the last of a
        // nearly full disk: the log and the index need it more.
        if ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
            || free_bytes(dir).is_some_and(|free| free < SPARE_ROOM)
        {
            continue;
        }
        match prepare(dir, SEGMENT_BYTES) {
            Ok(file) => *ready.lock().unwrap_or_else(PoisonError::into_inner) = Some(file),
            Err(err) => {
                // Not a failure of the store: the next segment is made when needed.
                let _ = fs::remove_file(dir.join(SPARE));
                if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    warned = Some(Instant::now());
                    tracing::warn!(error.message = %err, "preparing the next write-ahead log segment failed; it will be made when needed");
                }
            }
        }
    }
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let stats = rustix::fs::statvfs(dir).ok()?;
    Some(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// A segment file of `bytes`: header, zeros, synced, positioned after the header.
fn prepare(dir: &Path, bytes: u64) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(dir.join(SPARE))?;
    file.write_all(HEADER)?;
    let zeros = vec![0u8; 64 << 10];
    let mut left = bytes.saturating_sub(HEADER.len() as u64);
    while left > 0 {
        let n = usize::try_from(left).map_or(zeros.len(), |left| left.min(zeros.len()));
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    file.seek(SeekFrom::Start(HEADER.len() as u64))?;
    Ok(file)
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
        if len == 0 && crc == 0 {
            // No record is empty: this is a prepared segment's unwritten rest.
            return Ok(if bytes[at..].iter().all(|b| *b == 0) {
                SegmentEnd::Clean
            } else {
                SegmentEnd::Torn { at: at as u64 }
            });
        }
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

    /// A prepared segment, waited for (the preparer works on a thread of its own).
    fn prepared(preparer: &SegmentPreparer) -> File {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(file) = preparer.take() {
                return file;
            }
            assert!(std::time::Instant::now() < deadline, "no segment prepared");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_prepared_segment_takes_records_and_its_zeros_read_as_a_clean_end() {
        let dir = tempfile::tempdir().unwrap();
        let preparer = SegmentPreparer::start(dir.path());
        let mut wal = WalWriter::create(dir.path(), 1).unwrap();
        wal.append(b"in a plain segment").unwrap();
        wal.rotate(2, Some(prepared(&preparer))).unwrap();
        wal.append(b"one").unwrap();
        wal.append(b"two").unwrap();
        let segs = segments(dir.path()).unwrap();
        let firsts: Vec<u64> = segs.iter().map(|s| s.0).collect();
        assert_eq!(firsts, [1, 2], "the spare is never taken for a segment");
        // Written over, not appended: the file keeps its prepared size.
        assert_eq!(fs::metadata(&segs[1].1).unwrap().len(), SEGMENT_BYTES);
        let (read, end) = records(&segs[1].1);
        assert_eq!(read, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(end, SegmentEnd::Clean);
        // Closed, it keeps only its records.
        drop(wal);
        let written = HEADER.len() + 2 * FRAME + b"onetwo".len();
        assert_eq!(fs::metadata(&segs[1].1).unwrap().len(), written as u64);
        assert_eq!(records(&segs[1].1), (read, SegmentEnd::Clean));
    }

    #[test]
    fn a_record_torn_inside_a_prepared_segment_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let preparer = SegmentPreparer::start(dir.path());
        let mut wal = WalWriter::create(dir.path(), 1).unwrap();
        wal.rotate(1, Some(prepared(&preparer))).unwrap();
        wal.append(b"acknowledged").unwrap();
        wal.append(b"torn by a crash").unwrap();
        let path = segments(dir.path()).unwrap()[0].1.clone();
        let mut bytes = fs::read(&path).unwrap();
        let second = HEADER.len() + FRAME + b"acknowledged".len();
        // Only the start of the second record reached the disk; zeros follow.
        for b in &mut bytes[second + FRAME + 4..] {
            *b = 0;
        }
        fs::write(&path, &bytes).unwrap();
        let (read, end) = records(&path);
        assert_eq!(read, vec![b"acknowledged".to_vec()]);
        assert_eq!(end, SegmentEnd::Torn { at: second as u64 });
        // Or all of it but its frame: zeros there do not make a clean end.
        let mut bytes = fs::read(&path).unwrap();
        bytes[second + FRAME..second + FRAME + 4].copy_from_slice(b"torn");
        bytes[second..second + FRAME].fill(0);
        fs::write(&path, &bytes).unwrap();
        let (read, end) = records(&path);
        assert_eq!(read, vec![b"acknowledged".to_vec()]);
        assert_eq!(end, SegmentEnd::Torn { at: second as u64 });
    }

    #[test]
    fn a_record_that_does_not_fit_asks_for_the_next_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = WalWriter::create(dir.path(), 1).unwrap();
        let room = usize::try_from(SEGMENT_BYTES).unwrap() - HEADER.len() - 2 * FRAME;
        assert!(
            !wal.is_full_for(room * 2),
            "a segment takes at least one record"
        );
        wal.append(&vec![7; room / 2]).unwrap();
        assert!(!wal.is_full_for(room - room / 2));
        assert!(wal.is_full_for(room - room / 2 + 1));
    }

    #[test]
    fn a_stopped_preparer_leaves_no_spare_behind() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(SPARE), b"left by a crash").unwrap();
        let preparer = SegmentPreparer::start(dir.path());
        let spare = prepared(&preparer);
        drop(spare);
        preparer.ask();
        drop(preparer);
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn checkpointed_segments_are_deleted_but_never_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = WalWriter::create(dir.path(), 1).unwrap();
        wal.append(b"1..10").unwrap();
        wal.rotate(11, None).unwrap();
        wal.append(b"11..20").unwrap();
        wal.rotate(21, None).unwrap();
        assert_eq!(delete_checkpointed(dir.path(), 9).unwrap(), 0);
        assert_eq!(delete_checkpointed(dir.path(), 10).unwrap(), 1);
        assert_eq!(delete_checkpointed(dir.path(), 1_000).unwrap(), 1);
        let left: Vec<u64> = segments(dir.path()).unwrap().iter().map(|s| s.0).collect();
        assert_eq!(left, [21]);
    }
}
