//! Payloads in shared memory between the processes of one machine.
//!
//! A worker and a reducer on the same machine (a reducer reached over a unix socket) need not
//! copy every payload into a socket and out again: the writer puts it in a region of memory
//! both map, and the gRPC stream carries only where it lies ([`Desc`] and an offset). A region
//! is a sealed memfd: it has no name in any file system (nothing is left behind when a process
//! dies), its size cannot change once made (no reader can be made to fault on a page that was
//! cut off), and a peer opens it as `/proc/<pid>/fd/<fd>`, which only a process of the same
//! user on the same machine (and in the same pid namespace) may do. Its first page says what it
//! is: a magic number, a random 128-bit id and the payload length, all checked by the reader.
//!
//! What the memory holds is only as good as its writer: a reader checks every payload it takes
//! against the CRC-32 the stream carries, as for bytes from a socket. Within this process the
//! types keep Rust's rules: a [`Writer`]'s bytes are written under a lock and never lent out,
//! a [`SlotPool`]'s slot is written only while no view of it is alive, and a [`Reader`]'s
//! views are read-only. Another process writing a range while it is read is outside those
//! rules, as for any shared mapping; the protocol gives each payload its own place until the
//! round that reads it is over, and the checksums catch a writer that breaks that.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rustix::fd::{AsRawFd, OwnedFd};
use rustix::fs::{MemfdFlags, Mode, OFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

/// The first bytes of every region.
const MAGIC: [u8; 8] = *b"capsnet\x01";
/// The header's size: one page, so that payloads start page-aligned.
const HEADER: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("shared memory: {what}: {source}")]
    Os {
        what: &'static str,
        source: rustix::io::Errno,
    },
    #[error("shared memory region {path}: {reason}")]
    Region { path: String, reason: String },
    #[error("shared memory: {0}")]
    Range(String),
}

pub type Result<T> = std::result::Result<T, ShmError>;

fn os(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> ShmError {
    move |source| ShmError::Os { what, source }
}

/// How a peer finds a region: the path it opens, the id its header must carry, and its
/// payload length.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Desc {
    pub path: String,
    pub id: [u8; 16],
    pub len: u64,
}

/// Where a payload lies: in region `region`, from byte `offset` of its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct At {
    pub region: Arc<Desc>,
    pub offset: u64,
}

/// A mapping of a region (header and payload), unmapped when dropped.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    _fd: OwnedFd,
}

// SAFETY: the mapping is plain memory that outlives every reference to it (it is unmapped only
// on drop); which thread touches which bytes when is ruled by the types that own a `Mapping`.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are those of a mapping made by `map` and unmapped only here;
        // nothing borrows it any more (every view holds an `Arc` of its owner).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl Mapping {
    fn map(fd: OwnedFd, len: usize, writable: bool) -> Result<Self> {
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: a new shared mapping of `len` bytes of `fd`, placed by the kernel (no
        // existing memory is replaced); the file is sealed against shrinking (checked by the
        // caller for a peer's region), so every page of it stays backed.
        let ptr =
            unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, &fd, 0) }
                .map_err(os("mapping a region"))?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| ShmError::Range("the kernel mapped a region at address 0".into()))?;
        Ok(Mapping { ptr, len, _fd: fd })
    }

    /// Byte `at` of the payload.
    fn payload(&self, at: usize) -> *mut u8 {
        debug_assert!(HEADER + at <= self.len);
        // SAFETY: within the mapping (callers check `at + len` against the payload length).
        unsafe { self.ptr.as_ptr().add(HEADER + at) }
    }

    fn payload_len(&self) -> usize {
        self.len - HEADER
    }

    /// `len` bytes from payload byte `at`, if they lie within the payload.
    fn check(&self, at: usize, len: usize) -> Result<()> {
        match at.checked_add(len) {
            Some(end) if end <= self.payload_len() => Ok(()),
            _ => Err(ShmError::Range(format!(
                "{len} bytes at {at} lie outside a region of {} bytes",
                self.payload_len()
            ))),
        }
    }
}

/// A new sealed memfd region of `len` payload bytes, mapped for writing, with its header.
fn create(len: usize) -> Result<(Mapping, Arc<Desc>)> {
    let fd = rustix::fs::memfd_create(
        "capsnet-shm",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(os("creating a memfd"))?;
    let total = HEADER
        .checked_add(len)
        .ok_or_else(|| ShmError::Range(format!("a region of {len} bytes")))?;
    rustix::fs::ftruncate(&fd, total as u64).map_err(os("sizing a region"))?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
        .map_err(os("sealing a region"))?;
    let mut id = [0u8; 16];
    rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty())
        .map_err(os("drawing a region id"))?;
    let path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
    let map = Mapping::map(fd, total, true)?;
    let mut header = [0u8; 32];
    header[..8].copy_from_slice(&MAGIC);
    header[8..24].copy_from_slice(&id);
    header[24..].copy_from_slice(&(len as u64).to_le_bytes());
    // SAFETY: the header lies within the new mapping, which no one else knows of yet.
    unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), map.ptr.as_ptr(), header.len()) };
    let desc = Arc::new(Desc {
        path,
        id,
        len: len as u64,
    });
    Ok((map, desc))
}

/// Whether `path` names an open file of a process (`/proc/<pid>/fd/<fd>`), the only paths a
/// peer's region may be opened by.
fn is_proc_fd(path: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = path.split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(""), Some("proc"), Some(pid), Some("fd"), Some(fd), None)
            if (digits(pid) || pid == "self") && digits(fd)
    )
}

/// A region this process writes for a peer to read: every write holds a lock, and nothing in
/// this process reads it.
pub struct Writer {
    map: Mapping,
    desc: Arc<Desc>,
    lock: Mutex<()>,
}

impl Writer {
    pub fn create(len: usize) -> Result<Arc<Self>> {
        let (map, desc) = create(len)?;
        Ok(Arc::new(Writer {
            map,
            desc,
            lock: Mutex::new(()),
        }))
    }

    pub fn desc(&self) -> &Arc<Desc> {
        &self.desc
    }

    /// Lets `f` write the `len` payload bytes from `at` and returns what it returns.
    pub fn write_with<R>(
        &self,
        at: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R> {
        self.map.check(at, len)?;
        let _held = self
            .lock
            .lock()
            .map_err(|_| ShmError::Range("a write to a region panicked".into()))?;
        // SAFETY: within the mapping (checked); the lock makes this the only reference to the
        // region's bytes in this process, which never reads them otherwise.
        let out = unsafe { std::slice::from_raw_parts_mut(self.map.payload(at), len) };
        Ok(f(out))
    }
}

/// A peer's region, mapped read-only; its payloads as [`Bytes`] that keep it mapped.
pub struct Reader {
    map: Mapping,
    desc: Arc<Desc>,
}

impl Reader {
    /// Opens the region `desc` names, of at most `max_len` payload bytes: a sealed memfd of
    /// exactly the size it says, whose header carries its id.
    pub fn open(desc: &Desc, max_len: u64) -> Result<Arc<Self>> {
        let bad = |reason: String| ShmError::Region {
            path: desc.path.clone(),
            reason,
        };
        if !is_proc_fd(&desc.path) {
            return Err(bad("not a /proc/<pid>/fd/<fd> path".into()));
        }
        if desc.len > max_len {
            return Err(bad(format!(
                "{} bytes, more than the {max_len} expected",
                desc.len
            )));
        }
        let fd = rustix::fs::open(
            desc.path.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| bad(format!("cannot be opened here ({e})")))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| bad(format!("fstat: {e}")))?;
        let total = HEADER as u64 + desc.len;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile
            || st.st_size as u64 != total
        {
            return Err(bad(format!(
                "not a region of {} bytes (a file of {} bytes)",
                desc.len, st.st_size
            )));
        }
        let seals = rustix::fs::fcntl_get_seals(&fd)
            .map_err(|e| bad(format!("not a sealed memfd ({e})")))?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
            return Err(bad("not sealed against resizing".into()));
        }
        let map = Mapping::map(fd, total as usize, false)?;
        let mut header = [0u8; 32];
        // SAFETY: the header lies within the mapping; copied out, not borrowed.
        unsafe { std::ptr::copy_nonoverlapping(map.ptr.as_ptr(), header.as_mut_ptr(), 32) };
        if header[..8] != MAGIC
            || header[8..24] != desc.id
            || header[24..] != desc.len.to_le_bytes()
        {
            return Err(bad("its header is not the one of the region named".into()));
        }
        Ok(Arc::new(Reader {
            map,
            desc: Arc::new(desc.clone()),
        }))
    }

    pub fn desc(&self) -> &Arc<Desc> {
        &self.desc
    }

    /// The `len` payload bytes from `at`, without a copy.
    pub fn bytes(self: &Arc<Self>, at: u64, len: u64) -> Result<Bytes> {
        let (at, len) = (usize::try_from(at), usize::try_from(len));
        let (Ok(at), Ok(len)) = (at, len) else {
            return Err(ShmError::Range("an offset beyond the address space".into()));
        };
        self.map.check(at, len)?;
        Ok(Bytes::from_owner(ReaderView {
            reader: self.clone(),
            at,
            len,
        }))
    }
}

struct ReaderView {
    reader: Arc<Reader>,
    at: usize,
    len: usize,
}

impl AsRef<[u8]> for ReaderView {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: within the mapping (checked when made), which the `Arc` keeps; mapped
        // read-only here. The peer that writes it does so only outside the round that reads it
        // (the bytes are checked against their CRC where they are taken).
        unsafe { std::slice::from_raw_parts(self.reader.map.payload(self.at), self.len) }
    }
}

/// The regions of peers opened so far, by id (at most `cap`; the oldest is let go first).
pub struct Readers {
    open: Mutex<Vec<Arc<Reader>>>,
    cap: usize,
}

impl Readers {
    pub fn new(cap: usize) -> Self {
        Readers {
            open: Mutex::new(vec![]),
            cap: cap.max(1),
        }
    }

    /// The region `desc` names, opened now if it was not yet.
    pub fn get(&self, desc: &Desc, max_len: u64) -> Result<Arc<Reader>> {
        let poisoned = || ShmError::Range("the table of open regions is poisoned".into());
        if desc.len > max_len {
            return Err(ShmError::Region {
                path: desc.path.clone(),
                reason: format!("{} bytes, more than the {max_len} expected", desc.len),
            });
        }
        {
            let open = self.open.lock().map_err(|_| poisoned())?;
            if let Some(r) = open.iter().find(|r| *r.desc == *desc) {
                return Ok(r.clone());
            }
        }
        let r = Reader::open(desc, max_len)?;
        let mut open = self.open.lock().map_err(|_| poisoned())?;
        if open.len() >= self.cap {
            open.remove(0);
        }
        open.push(r.clone());
        Ok(r)
    }

    pub fn len(&self) -> usize {
        self.open.lock().map_or(0, |o| o.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Fixed slots of a region, for payloads that live until their last [`Bytes`] is dropped:
/// a slot is written only while it is free of views, and is free again when they are gone.
#[derive(Clone)]
pub struct SlotPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    map: Mapping,
    desc: Arc<Desc>,
    slot_len: usize,
    free: Mutex<Vec<usize>>,
}

impl SlotPool {
    /// `slots` slots of `slot_len` bytes each.
    pub fn create(slots: usize, slot_len: usize) -> Result<Self> {
        let len = slots
            .checked_mul(slot_len)
            .ok_or_else(|| ShmError::Range(format!("{slots} slots of {slot_len} bytes")))?;
        let (map, desc) = create(len)?;
        Ok(SlotPool {
            inner: Arc::new(PoolInner {
                map,
                desc,
                slot_len,
                free: Mutex::new((0..slots).rev().collect()),
            }),
        })
    }

    pub fn desc(&self) -> &Arc<Desc> {
        &self.inner.desc
    }

    /// A free slot for `len` bytes; None when none is free or `len` does not fit one.
    pub fn take(&self, len: usize) -> Option<SlotBuf> {
        if len > self.inner.slot_len {
            return None;
        }
        let slot = self.inner.free.lock().ok()?.pop()?;
        Some(SlotBuf {
            inner: self.inner.clone(),
            slot,
            len,
        })
    }

    /// Slots free now.
    pub fn free_slots(&self) -> usize {
        self.inner.free.lock().map_or(0, |f| f.len())
    }
}

/// A slot taken from a [`SlotPool`]: written through `as_mut`, then frozen into its payload.
pub struct SlotBuf {
    inner: Arc<PoolInner>,
    slot: usize,
    len: usize,
}

impl AsMut<[u8]> for SlotBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: the slot lies within the mapping, and was taken off the free list: no other
        // `SlotBuf` or view of it exists until this one (or its view) is dropped.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.inner.map.payload(self.slot * self.inner.slot_len),
                self.len,
            )
        }
    }
}

impl SlotBuf {
    /// The payload as [`Bytes`] (the slot is free again when the last of them is dropped) and
    /// where it lies.
    pub fn freeze(self) -> (Bytes, At) {
        let at = At {
            region: self.inner.desc.clone(),
            offset: (self.slot * self.inner.slot_len) as u64,
        };
        (Bytes::from_owner(self), at)
    }
}

impl AsRef<[u8]> for SlotBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: as in `as_mut`; a frozen slot is only read.
        unsafe {
            std::slice::from_raw_parts(
                self.inner.map.payload(self.slot * self.inner.slot_len),
                self.len,
            )
        }
    }
}

impl Drop for SlotBuf {
    fn drop(&mut self) {
        if let Ok(mut f) = self.inner.free.lock() {
            f.push(self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writers_bytes_are_read_through_another_mapping() {
        let w = Writer::create(1 << 16).unwrap();
        w.write_with(100, 5, |b| b.copy_from_slice(b"hello"))
            .unwrap();
        let r = Reader::open(w.desc(), 1 << 16).unwrap();
        assert_eq!(&r.bytes(100, 5).unwrap()[..], b"hello");
        // Writes after the view was taken show through it (the same memory).
        let v = r.bytes(0, 1 << 16).unwrap();
        w.write_with(0, 3, |b| b.copy_from_slice(b"abc")).unwrap();
        assert_eq!(&v[..3], b"abc");
        // The region stays mapped while a view lives, after its reader is gone.
        drop(r);
        assert_eq!(&v[100..105], b"hello");
    }

    #[test]
    fn out_of_range_writes_and_views_are_refused() {
        let w = Writer::create(4096).unwrap();
        assert!(w.write_with(4000, 97, |_| ()).is_err());
        assert!(w.write_with(usize::MAX, 2, |_| ()).is_err());
        let r = Reader::open(w.desc(), 4096).unwrap();
        assert!(r.bytes(4096, 1).is_err());
        assert!(r.bytes(u64::MAX, 2).is_err());
        assert!(r.bytes(4096, 0).is_ok());
    }

    #[test]
    fn a_region_that_is_not_the_one_named_is_refused() {
        let w = Writer::create(4096).unwrap();
        let d = w.desc().as_ref().clone();
        let err = |d: &Desc, max| match Reader::open(d, max) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{d:?} opened"),
        };
        // Another id, another length, more than expected, not a /proc fd path, a plain file.
        let e = err(
            &Desc {
                id: [7; 16],
                ..d.clone()
            },
            4096,
        );
        assert!(e.contains("header"), "{e}");
        let e = err(
            &Desc {
                len: 4000,
                ..d.clone()
            },
            4096,
        );
        assert!(e.contains("not a region of 4000 bytes"), "{e}");
        let e = err(&d, 1000);
        assert!(e.contains("more than the 1000 expected"), "{e}");
        for p in [
            "/etc/passwd",
            "/proc/1/fd/../../etc/passwd",
            "/proc/x/fd/3",
            "relative",
        ] {
            let e = err(
                &Desc {
                    path: p.into(),
                    ..d.clone()
                },
                4096,
            );
            assert!(e.contains("not a /proc/<pid>/fd/<fd> path"), "{p}: {e}");
        }
        let f = tempfile_in_proc();
        let e = err(
            &Desc {
                path: f.1.clone(),
                len: 0,
                ..d.clone()
            },
            4096,
        );
        assert!(e.contains("sealed") || e.contains("not a region"), "{e}");
        drop(f);
        // A closed descriptor.
        let e = err(
            &Desc {
                path: format!("/proc/{}/fd/999999", std::process::id()),
                ..d
            },
            4096,
        );
        assert!(e.contains("cannot be opened here"), "{e}");
    }

    /// An unsealed memfd of `HEADER` bytes, open in this process, and its /proc path.
    fn tempfile_in_proc() -> (OwnedFd, String) {
        let fd = rustix::fs::memfd_create("plain", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, HEADER as u64).unwrap();
        let p = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
        (fd, p)
    }

    #[test]
    fn a_slot_is_taken_again_only_once_its_views_are_gone() {
        let pool = SlotPool::create(2, 64).unwrap();
        let r = Reader::open(pool.desc(), 128).unwrap();
        let mut a = pool.take(64).unwrap();
        a.as_mut().fill(1);
        let (bytes, at) = a.freeze();
        assert_eq!(r.bytes(at.offset, 64).unwrap()[..], [1u8; 64][..]);
        let mut b = pool.take(10).unwrap();
        b.as_mut().fill(2);
        assert!(pool.take(1).is_none(), "both slots are in use");
        assert!(pool.take(65).is_none(), "larger than a slot");
        let copy = bytes.clone();
        drop(bytes);
        assert!(pool.take(1).is_none(), "a view is still alive");
        drop(copy);
        let c = pool.take(64).unwrap();
        assert_eq!(
            c.as_ref(),
            &[1u8; 64][..],
            "the slot of the views just dropped"
        );
        drop((b, c));
        assert_eq!(pool.free_slots(), 2);
    }

    #[test]
    fn readers_are_opened_once_and_the_oldest_let_go() {
        let ws: Vec<_> = (0..3).map(|_| Writer::create(4096).unwrap()).collect();
        let readers = Readers::new(2);
        let a = readers.get(ws[0].desc(), 4096).unwrap();
        let again = readers.get(ws[0].desc(), 4096).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        readers.get(ws[1].desc(), 4096).unwrap();
        readers.get(ws[2].desc(), 4096).unwrap();
        assert_eq!(readers.len(), 2);
        let fresh = readers.get(ws[0].desc(), 4096).unwrap();
        assert!(!Arc::ptr_eq(&a, &fresh), "opened again after it was let go");
    }

    #[test]
    fn paths_of_process_descriptors_only() {
        assert!(is_proc_fd("/proc/123/fd/4"));
        assert!(is_proc_fd("/proc/self/fd/4"));
        for p in [
            "/proc/123/fd/",
            "/proc/123/fd/4/x",
            "proc/1/fd/2",
            "/proc/1/mem",
            "/tmp/x",
        ] {
            assert!(!is_proc_fd(p), "{p}");
        }
    }
}
