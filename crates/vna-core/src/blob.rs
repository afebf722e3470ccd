//! Atomic create-new blob files: the one writer of vna's filesystem blob stores.
//!
//! A blob is written under a temporary name in the store's `.tmp` directory
//! (created with `O_CREAT | O_EXCL`), hashed while written, fsynced, then
//! published by a hard link under its key: the link fails when the key exists,
//! so a blob is never replaced. The temporary name is removed afterwards and the
//! key's directory fsynced. A crash leaves at most a temporary file, never a
//! partial blob under a key. `fsync: false` skips every fsync (tests, benchmarks).
//!
//! A file the caller owns and never writes again (a spool file) can be *adopted*:
//! given the store's file mode, fsynced and hard-linked under the key without a
//! copy, when it lives on the store's filesystem and the filesystem can link it.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// The directory of a store's temporary names (keys never start with a dot).
pub const TMP_DIR: &str = ".tmp";

/// Errors of `link` that mean "no hard link possible here" (an adopting caller copies instead).
const NO_LINK: [i32; 4] = [libc::EXDEV, libc::EPERM, libc::EMLINK, libc::ENOTSUP];
/// Errors of `copy_file_range` at the first byte after which `sendfile` is used instead.
const NO_COPY_RANGE: [i32; 4] = [libc::EXDEV, libc::ENOSYS, libc::EINVAL, libc::EOPNOTSUPP];

/// How a store writes its blobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Fsync every file and every directory a write touches.
    pub fsync: bool,
    /// Permission bits of a new blob (before the umask); an adopted file gets exactly these.
    pub file_mode: u32,
}

/// A blob written under its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub size: u64,
    /// SHA-256 of the bytes, when they passed through this process (not for kernel copies or adoption).
    pub sha256: Option<[u8; 32]>,
}

/// Check a blob key: `/`-separated segments of `[A-Za-z0-9._-]`, none empty or starting with a dot,
/// at most 1024 bytes. `InvalidInput` otherwise (the last defence against path traversal).
pub fn check_key(key: &str) -> io::Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 1024
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsafe blob key {key:?}"),
        ))
    }
}

fn fsync_dir(path: &Path) -> io::Result<()> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)?;
    dir.sync_all()
}

fn errno_in(e: &io::Error, set: &[i32]) -> bool {
    e.raw_os_error().is_some_and(|n| set.contains(&n))
}

/// A store's directory: `root/<key>` holds each blob, `root/.tmp` the temporary names.
#[derive(Debug)]
pub struct BlobDir {
    root: PathBuf,
    tmp: PathBuf,
    opts: Options,
    dev: OnceLock<u64>,
}

impl BlobDir {
    /// A store rooted at `root` (nothing is created: the caller makes `root/.tmp`).
    pub fn new(root: impl Into<PathBuf>, opts: Options) -> Self {
        let root = root.into();
        let tmp = root.join(TMP_DIR);
        BlobDir {
            root,
            tmp,
            opts,
            dev: OnceLock::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn options(&self) -> Options {
        self.opts
    }

    /// A new temporary file in `root/.tmp` (mode `file_mode`), to be filled and committed under a key.
    pub fn temp(&self) -> io::Result<TempBlob> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        loop {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let name = format!(
                "{:x}-{:x}-{:x}.part",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed),
                nanos
            );
            let path = self.tmp.join(name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(self.opts.file_mode)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(TempBlob {
                        file: Some(file),
                        path,
                        sha: Sha256::new(),
                        size: 0,
                        hashed: true,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Write a copy of the local file `source` under `key`, copied in the kernel (`copy_file_range`,
    /// `sendfile` where that is refused). `AlreadyExists` if the key exists.
    pub fn copy_file(&self, key: &str, source: &Path) -> io::Result<Written> {
        check_key(key)?;
        let mut temp = self.temp()?;
        temp.copy_from(source)?;
        temp.commit(self, key)
    }

    /// Take the file `source` over as `key`'s blob: file mode set, fsynced, hard-linked (create-new).
    ///
    /// `Ok(None)` when `source` is on another filesystem or this filesystem cannot link it (the
    /// caller copies instead); `AlreadyExists` if the key exists. `source` keeps its own name.
    pub fn adopt(&self, key: &str, source: &Path) -> io::Result<Option<Written>> {
        check_key(key)?;
        let size = {
            let file = File::open(source)?;
            let meta = file.metadata()?;
            if meta.dev() != self.dev()? {
                return Ok(None);
            }
            file.set_permissions(fs::Permissions::from_mode(self.opts.file_mode))?;
            if self.opts.fsync {
                file.sync_all()?;
            }
            meta.len()
        };
        if !self.publish(key, source, true)? {
            return Ok(None);
        }
        Ok(Some(Written { size, sha256: None }))
    }

    fn dev(&self) -> io::Result<u64> {
        if let Some(dev) = self.dev.get() {
            return Ok(*dev);
        }
        let dev = fs::metadata(&self.tmp)?.dev();
        Ok(*self.dev.get_or_init(|| dev))
    }

    /// Hard-link the fsynced `source` as `key`'s file and fsync its directory, making the missing
    /// directories on the way. False when `may_decline` and no hard link is possible here.
    fn publish(&self, key: &str, source: &Path, may_decline: bool) -> io::Result<bool> {
        let target = self.root.join(key);
        let parent = target.parent().unwrap_or(&self.root).to_path_buf();
        let linked = fs::hard_link(source, &target).or_else(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                // no directory yet (a series' first instance): make it, link again
                self.makedirs(&parent)?;
                fs::hard_link(source, &target)
            } else {
                Err(e)
            }
        });
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
            Err(e) if may_decline && errno_in(&e, &NO_LINK) => return Ok(false),
            Err(e) => return Err(e),
        }
        if self.opts.fsync {
            fsync_dir(&parent)?;
        }
        Ok(true)
    }

    /// Create the missing directories of `dir` below the root, fsyncing each new one's parent.
    fn makedirs(&self, dir: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut d = dir;
        while d != self.root && !d.exists() {
            missing.push(d);
            match d.parent() {
                Some(p) => d = p,
                None => break,
            }
        }
        for d in missing.into_iter().rev() {
            match fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
            if self.opts.fsync {
                fsync_dir(d.parent().unwrap_or(&self.root))?;
            }
        }
        Ok(())
    }
}

/// A blob being written under a temporary name; removed when dropped uncommitted.
#[derive(Debug)]
pub struct TempBlob {
    file: Option<File>,
    path: PathBuf,
    sha: Sha256,
    size: u64,
    /// False once bytes went in without passing through this process.
    hashed: bool,
}

impl TempBlob {
    /// The temporary file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn file(&mut self) -> io::Result<&mut File> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("blob already committed"))
    }

    /// Append `data` (all of it: short writes are continued), hashing it.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file()?.write_all(data)?;
        self.sha.update(data);
        self.size += data.len() as u64;
        Ok(())
    }

    /// Append the bytes of the local file `source` (its size when opened), copied in the kernel.
    pub fn copy_from(&mut self, source: &Path) -> io::Result<u64> {
        let src = File::open(source)?;
        let total = src.metadata()?.len();
        let out = self.file()?.as_raw_fd();
        let inp = src.as_raw_fd();
        let mut done: u64 = 0;
        let mut use_range = true;
        while done < total {
            let want = usize::try_from(total - done).unwrap_or(usize::MAX);
            let n = if use_range {
                // SAFETY: both descriptors are open for the call; null offsets use the file positions
                unsafe {
                    libc::copy_file_range(
                        inp,
                        std::ptr::null_mut(),
                        out,
                        std::ptr::null_mut(),
                        want,
                        0,
                    )
                }
            } else {
                let mut off = done as libc::off_t;
                // SAFETY: both descriptors are open; `off` outlives the call
                unsafe { libc::sendfile(out, inp, &mut off, want) }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // copy_file_range refuses other filesystems (EXDEV) on some kernels
                if use_range && done == 0 && errno_in(&e, &NO_COPY_RANGE) {
                    use_range = false;
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            done += n as u64;
        }
        self.size += done;
        self.hashed = false;
        Ok(done)
    }

    /// Fsync the file, publish it under `key` (create-new: `AlreadyExists` if the key exists) and
    /// remove the temporary name.
    pub fn commit(mut self, dir: &BlobDir, key: &str) -> io::Result<Written> {
        check_key(key)?;
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("blob already committed"))?;
        if dir.opts.fsync {
            file.sync_all()?;
        }
        drop(file);
        dir.publish(key, &self.path, false)?;
        let sha = std::mem::take(&mut self.sha);
        Ok(Written {
            size: self.size,
            sha256: self.hashed.then(|| sha.finalize().into()),
        })
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        self.file.take();
        if let Ok(path) = CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path; failure (already gone) is ignored
            unsafe { libc::unlink(path.as_ptr()) };
        }
    }
}

/// One store's part of [`write_replicas`]: what it wrote or why not, and when (ns since the epoch).
#[derive(Debug)]
pub struct ReplicaOutcome {
    pub result: io::Result<Written>,
    pub started_ns: u64,
    pub ended_ns: u64,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The process's replica writer threads: started on demand, kept waiting for the next job.
///
/// A thread started per write would queue behind every runnable thread of a busy machine (a
/// new thread starts at the back of the scheduler's queue), a woken waiting one does not.
struct Pool {
    jobs: Mutex<mpsc::Sender<Job>>,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    idle: Arc<AtomicUsize>,
    threads: AtomicUsize,
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads beyond which jobs wait for a busy one.
const MAX_THREADS: usize = 64;

impl Pool {
    /// This process's pool (a child made by `fork` has none of its parent's threads: a new pool).
    fn get() -> Arc<Pool> {
        static POOL: Mutex<Option<(u32, Arc<Pool>)>> = Mutex::new(None);
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let pid = std::process::id();
        match pool.as_ref() {
            Some((owner, p)) if *owner == pid => Arc::clone(p),
            _ => {
                let (tx, rx) = mpsc::channel();
                let p = Arc::new(Pool {
                    jobs: Mutex::new(tx),
                    queue: Arc::new(Mutex::new(rx)),
                    idle: Arc::new(AtomicUsize::new(0)),
                    threads: AtomicUsize::new(0),
                });
                *pool = Some((pid, Arc::clone(&p)));
                p
            }
        }
    }

    fn submit(&self, job: Job) {
        let grow = |n: usize| (n < MAX_THREADS).then_some(n + 1);
        if self.idle.load(Ordering::SeqCst) == 0
            && self
                .threads
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, grow)
                .is_ok()
        {
            let (queue, idle) = (Arc::clone(&self.queue), Arc::clone(&self.idle));
            let started = std::thread::Builder::new()
                .name("vna-blob-writer".into())
                .spawn(move || loop {
                    idle.fetch_add(1, Ordering::SeqCst);
                    let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    idle.fetch_sub(1, Ordering::SeqCst);
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
            if started.is_err() {
                self.threads.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        // the receiver lives as long as the pool's threads: a job that cannot be sent is dropped, and
        // its caller sees its result channel closed
        let _ = jobs.send(job);
    }
}

fn write_one(dir: &BlobDir, key: &str, source: &Path, adopt: bool) -> ReplicaOutcome {
    let started_ns = now_ns();
    let result = (|| {
        if adopt {
            if let Some(w) = dir.adopt(key, source)? {
                return Ok(w);
            }
        }
        dir.copy_file(key, source)
    })();
    ReplicaOutcome {
        result,
        started_ns,
        ended_ns: now_ns(),
    }
}

/// Write `source` under `key` to every store of `dirs` in parallel: the first in the calling
/// thread, the others on the process's writer threads; with `adopt`, the first store takes the file
/// over if it can (see [`BlobDir::adopt`]), the others copy it. One outcome per store, in order.
pub fn write_replicas(
    dirs: &[Arc<BlobDir>],
    key: &str,
    source: &Path,
    adopt: bool,
) -> Vec<ReplicaOutcome> {
    let Some((first, rest)) = dirs.split_first() else {
        return Vec::new();
    };
    let pool = Pool::get();
    let waiting: Vec<mpsc::Receiver<ReplicaOutcome>> = rest
        .iter()
        .map(|dir| {
            let (tx, rx) = mpsc::channel();
            let (dir, key, source) = (Arc::clone(dir), key.to_string(), source.to_path_buf());
            pool.submit(Box::new(move || {
                let _ = tx.send(write_one(&dir, &key, &source, false));
            }));
            rx
        })
        .collect();
    let mut out = vec![write_one(first, key, source, adopt)];
    for rx in waiting {
        out.push(rx.recv().unwrap_or_else(|_| ReplicaOutcome {
            result: Err(io::Error::other("replica writer failed")),
            started_ns: 0,
            ended_ns: 0,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(tmp: &Path, name: &str, fsync: bool) -> BlobDir {
        let root = tmp.join(name);
        fs::create_dir_all(root.join(TMP_DIR)).unwrap();
        BlobDir::new(
            root,
            Options {
                fsync,
                file_mode: 0o600,
            },
        )
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vna-blob-{name}-{}-{:?}",
            std::process::id(),
            SystemTime::now()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn tmp_names(dir: &BlobDir) -> usize {
        fs::read_dir(dir.root().join(TMP_DIR)).unwrap().count()
    }

    #[test]
    fn write_hash_publish_create_new() {
        let t = scratch("w");
        let d = store(&t, "s", true);
        let mut b = d.temp().unwrap();
        b.write(b"hello ").unwrap();
        b.write(b"world").unwrap();
        let w = b.commit(&d, "a/b/c").unwrap();
        assert_eq!(w.size, 11);
        assert_eq!(
            w.sha256.unwrap().to_vec(),
            Sha256::digest(b"hello world").to_vec()
        );
        assert_eq!(fs::read(d.root().join("a/b/c")).unwrap(), b"hello world");
        let mut again = d.temp().unwrap();
        again.write(b"other").unwrap();
        let e = again.commit(&d, "a/b/c").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(d.root().join("a/b/c")).unwrap(), b"hello world");
        assert_eq!(tmp_names(&d), 0);
        fs::remove_dir_all(t).unwrap();
    }

    #[test]
    fn dropped_temp_leaves_nothing() {
        let t = scratch("d");
        let d = store(&t, "s", false);
        let mut b = d.temp().unwrap();
        b.write(&[7; 100_000]).unwrap();
        assert_eq!(tmp_names(&d), 1);
        drop(b);
        assert_eq!(tmp_names(&d), 0);
        fs::remove_dir_all(t).unwrap();
    }

    #[test]
    fn unsafe_keys_refused() {
        for key in [
            "", "/a", "a//b", "../x", "a/../b", ".tmp/x", "a/.h", "sp ace", "a\\b",
        ] {
            assert_eq!(
                check_key(key).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{key}"
            );
        }
        check_key("st/1.2.3/obj-_x").unwrap();
    }

    #[test]
    fn replicas_adopt_once_and_copy() {
        let t = scratch("r");
        let dirs: Vec<Arc<BlobDir>> = (0..3)
            .map(|i| Arc::new(store(&t, &format!("r{i}"), true)))
            .collect();
        let spool = t.join("r0").join("spool.dcm");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        fs::write(&spool, &data).unwrap();
        let out = write_replicas(&dirs, "k/x.dcm", &spool, true);
        let ino = fs::metadata(&spool).unwrap().ino();
        for (i, (r, d)) in out.iter().zip(&dirs).enumerate() {
            assert_eq!(r.result.as_ref().unwrap().size, data.len() as u64);
            assert!(r.started_ns <= r.ended_ns);
            let p = d.root().join("k/x.dcm");
            assert_eq!(fs::read(&p).unwrap(), data);
            assert_eq!(fs::metadata(&p).unwrap().ino() == ino, i == 0);
        }
        let again = write_replicas(&dirs, "k/x.dcm", &spool, true);
        assert!(again
            .iter()
            .all(|r| r.result.as_ref().unwrap_err().kind() == io::ErrorKind::AlreadyExists));
        fs::remove_dir_all(t).unwrap();
    }
}
