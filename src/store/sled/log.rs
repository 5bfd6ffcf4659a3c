//! The trace log: whole trace records, appended to one file beside sled's own, with sled keeping
//! only where each one is.
//!
//! sled copies a leaf on every insert, rewrites it whole every few updates and splits it every 16
//! entries. With traces of a few KB in the leaves, that wrote ~10 KB per 2.3 KB trace
//! (`tests/store_memory.rs`; ~13 KB per trace in the gateway under load) and was most of the
//! recorder's page faults. Here a trace is written once, in one `write` per batch, and sled holds
//! its 12-byte [`Location`] beside its key, in a chunk of keys (`chunks`): ~3.3 KB written per
//! trace.
//!
//! A record is `len (u32, big-endian) ‖ trace key (16 bytes) ‖ payload`; the payload is the
//! encoded trace (codec byte, then JSON), exactly what the tree held inline before. Reading checks
//! the length and the key, so a location whose bytes were lost (a power cut between sled's flush
//! and the log's) reads as an error about that one trace, never as another trace. Traces are
//! never deleted, so the file only grows; a record replaced (a score added) stays behind, unused.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{TraceKey, TRACE_KEY_LEN};
use crate::store::StoreError;

const FILE_NAME: &str = "traces.log";
const HEAD_LEN: usize = 4 + TRACE_KEY_LEN;
/// What a [`Location`] takes in sled.
pub(super) const LOCATION_LEN: usize = 12;

/// Where one record's payload is in the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Location {
    /// Of the record's head.
    offset: u64,
    /// Of the payload.
    len: u32,
}

impl Location {
    pub(super) fn to_bytes(self) -> [u8; LOCATION_LEN] {
        let mut bytes = [0; LOCATION_LEN];
        bytes[..8].copy_from_slice(&self.offset.to_be_bytes());
        bytes[8..].copy_from_slice(&self.len.to_be_bytes());
        bytes
    }

    pub(super) fn from_bytes(bytes: &[u8]) -> Option<Location> {
        let bytes: &[u8; LOCATION_LEN] = bytes.try_into().ok()?;
        let (offset, len) = bytes.split_at(8);
        Some(Location {
            offset: u64::from_be_bytes(offset.try_into().ok()?),
            len: u32::from_be_bytes(len.try_into().ok()?),
        })
    }
}

pub(super) struct TraceLog {
    path: PathBuf,
    file: File,
    /// Where the next record goes. Held while appending: one writer at a time.
    end: Mutex<u64>,
}

/// Records of one batch, laid out as they will be appended.
#[derive(Default)]
pub(super) struct Records {
    bytes: Vec<u8>,
}

impl Records {
    /// Empties it, keeping its buffer, with room for at least `bytes` more.
    pub(super) fn clear_and_reserve(&mut self, bytes: usize) {
        self.bytes.clear();
        self.bytes.reserve(bytes);
    }

    /// The bytes its buffer holds without growing.
    pub(super) fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// Adds one record, its payload written by `write_payload`; returns its place relative to
    /// the start of the batch. A payload that fails to write leaves nothing behind.
    pub(super) fn push(
        &mut self,
        key: &TraceKey,
        write_payload: impl FnOnce(&mut Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<Location, StoreError> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        self.bytes.extend_from_slice(key);
        let written = write_payload(&mut self.bytes).and_then(|()| {
            let len = self.bytes.len() - start - HEAD_LEN;
            u32::try_from(len).map_err(|_| StoreError::Corrupt {
                what: "a trace record".into(),
                reason: format!("{len} bytes, more than a log record holds"),
            })
        });
        match written {
            Ok(len) => {
                self.bytes[start..start + 4].copy_from_slice(&len.to_be_bytes());
                Ok(Location {
                    offset: start as u64,
                    len,
                })
            }
            Err(err) => {
                self.bytes.truncate(start);
                Err(err)
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl TraceLog {
    /// Opens (or creates) the log in sled's directory `dir`.
    pub(super) fn open(dir: &Path) -> Result<TraceLog, StoreError> {
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| StoreError::Log {
                path: path.clone(),
                source,
            })?;
        let end = file
            .metadata()
            .map_err(|source| StoreError::Log {
                path: path.clone(),
                source,
            })?
            .len();
        Ok(TraceLog {
            path,
            file,
            end: Mutex::new(end),
        })
    }

    /// Appends a batch's records in one write; returns the offset they start at, to add to each
    /// record's [`Location`] (see [`TraceLog::placed`]).
    pub(super) fn append(&self, records: &Records) -> Result<u64, StoreError> {
        // A poisoned lock only means a panic elsewhere; the offset it guards is still right.
        let mut end = self
            .end
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let start = *end;
        write_all_at(&self.file, &records.bytes, start).map_err(|err| self.error(err))?;
        *end = start + records.bytes.len() as u64;
        Ok(start)
    }

    /// A record's location in the file, from its place in a batch appended at `start`.
    pub(super) fn placed(start: u64, in_batch: Location) -> Location {
        Location {
            offset: start + in_batch.offset,
            len: in_batch.len,
        }
    }

    /// The payload of the record of `key` at `at`.
    pub(super) fn read(&self, key: &TraceKey, at: Location) -> Result<Vec<u8>, String> {
        // Checked before allocating: a damaged location must not ask for gigabytes.
        let end = *self
            .end
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let record_end = at
            .offset
            .saturating_add((HEAD_LEN as u64) + u64::from(at.len));
        if record_end > end {
            return Err(format!(
                "its record at byte {} of {} cannot be read: it would end at byte {record_end}, \
                 past the log's {end} (lost in a power cut?)",
                at.offset,
                self.path.display()
            ));
        }
        let mut record = vec![0; HEAD_LEN + at.len as usize];
        read_exact_at(&self.file, &mut record, at.offset).map_err(|err| {
            format!(
                "its record at byte {} of {} cannot be read: {err}",
                at.offset,
                self.path.display()
            )
        })?;
        let (head, _) = record.split_at(HEAD_LEN);
        if head[..4] != at.len.to_be_bytes() || head[4..] != key[..] {
            return Err(format!(
                "the record at byte {} of {} is not this trace's (lost in a crash?)",
                at.offset,
                self.path.display()
            ));
        }
        record.drain(..HEAD_LEN);
        Ok(record)
    }

    /// Makes everything appended durable.
    pub(super) fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(|err| self.error(err))
    }

    fn error(&self, source: io::Error) -> StoreError {
        StoreError::Log {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(unix)]
fn write_all_at(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn write_all_at(file: &File, mut bytes: &[u8], mut offset: u64) -> io::Result<()> {
    while !bytes.is_empty() {
        let written = std::os::windows::fs::FileExt::seek_write(file, bytes, offset)?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[written..];
        offset += written as u64;
    }
    Ok(())
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let read = std::os::windows::fs::FileExt::seek_read(file, buf, offset)?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[read..];
        offset += read as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_a_wrong_location_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = TraceLog::open(dir.path()).unwrap();
        let (a, b) = ([1u8; TRACE_KEY_LEN], [2u8; TRACE_KEY_LEN]);
        let mut first = Records::default();
        let payload = |bytes: &'static [u8]| {
            move |buf: &mut Vec<u8>| {
                buf.extend_from_slice(bytes);
                Ok(())
            }
        };
        let at_a = first.push(&a, payload(b"first payload")).unwrap();
        // A payload that fails leaves no trace in the batch.
        let failed = first.push(&b, |buf| {
            buf.extend_from_slice(b"half");
            Err(StoreError::KeyTooLong { len: 0 })
        });
        assert!(failed.is_err());
        let start = log.append(&first).unwrap();
        let mut second = Records::default();
        let at_b = second.push(&b, payload(b"second")).unwrap();
        let at_b = TraceLog::placed(log.append(&second).unwrap(), at_b);
        let at_a = TraceLog::placed(start, at_a);

        assert_eq!(log.read(&a, at_a).unwrap(), b"first payload");
        assert_eq!(log.read(&b, at_b).unwrap(), b"second");
        assert_eq!(Location::from_bytes(&at_b.to_bytes()), Some(at_b));
        // Another trace's record, and bytes past the end (a tail lost in a power cut).
        assert!(log.read(&a, at_b).unwrap_err().contains("not this trace's"));
        let beyond = Location {
            offset: at_b.offset + 1000,
            len: 6,
        };
        assert!(log.read(&b, beyond).unwrap_err().contains("cannot be read"));
        // A damaged location asks for no more than the log holds.
        let huge = Location {
            offset: 0,
            len: u32::MAX,
        };
        assert!(log.read(&a, huge).unwrap_err().contains("past the log's"));

        // Reopened, it appends after what is there.
        drop(log);
        let log = TraceLog::open(dir.path()).unwrap();
        let mut third = Records::default();
        let at_c = third.push(&a, payload(b"third")).unwrap();
        let at_c = TraceLog::placed(log.append(&third).unwrap(), at_c);
        assert!(at_c.offset > at_b.offset);
        assert_eq!(log.read(&b, at_b).unwrap(), b"second");
        assert_eq!(log.read(&a, at_c).unwrap(), b"third");
    }
}
