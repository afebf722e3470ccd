//! The binding of vna-core's blob writer (`vna_core::blob`): the filesystem blob stores' atomic
//! create-new writes, every call with the GIL released.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use vna_core::blob::{self, Options, TempBlob, Written};

/// An `io::Error` as Python raises it: `OSError(errno, strerror)` (so `FileExistsError` for
/// EEXIST, ...), `ValueError` for an unsafe key.
fn os_error(e: io::Error) -> PyErr {
    match e.raw_os_error() {
        Some(n) => {
            let text = e.to_string();
            let strerror = text
                .strip_suffix(&format!(" (os error {n})"))
                .unwrap_or(&text)
                .to_string();
            PyOSError::new_err((n, strerror))
        }
        None if e.kind() == io::ErrorKind::InvalidInput => PyValueError::new_err(e.to_string()),
        None => PyOSError::new_err(e.to_string()),
    }
}

fn hex(w: &Written) -> Option<String> {
    w.sha256
        .map(|d| d.iter().map(|b| format!("{b:02x}")).collect())
}

/// A filesystem blob store's directory: blobs under ``root``, temporary names in ``root/.tmp``.
#[pyclass(frozen, module = "vna_native")]
struct BlobDir {
    inner: Arc<blob::BlobDir>,
}

#[pymethods]
impl BlobDir {
    #[new]
    #[pyo3(signature = (root, *, fsync, file_mode))]
    fn new(root: PathBuf, fsync: bool, file_mode: u32) -> Self {
        BlobDir {
            inner: Arc::new(blob::BlobDir::new(root, Options { fsync, file_mode })),
        }
    }

    /// A new temporary file to fill with ``BlobWriter.write`` and publish with ``BlobWriter.commit``.
    fn writer(&self, py: Python<'_>) -> PyResult<BlobWriter> {
        let temp = py.detach(|| self.inner.temp()).map_err(os_error)?;
        Ok(BlobWriter {
            dir: Arc::clone(&self.inner),
            temp: Mutex::new(Some(temp)),
        })
    }

    /// Copy the local file ``source`` under ``key`` in the kernel; the size written.
    fn put_file(&self, py: Python<'_>, key: &str, source: PathBuf) -> PyResult<u64> {
        py.detach(|| self.inner.copy_file(key, &source))
            .map(|w| w.size)
            .map_err(os_error)
    }

    /// Take ``source`` over as ``key``'s blob (file mode, fsync, hard link); its size, or None when
    /// it is on another filesystem or cannot be linked here.
    fn adopt(&self, py: Python<'_>, key: &str, source: PathBuf) -> PyResult<Option<u64>> {
        py.detach(|| self.inner.adopt(key, &source))
            .map(|w| w.map(|w| w.size))
            .map_err(os_error)
    }
}

/// A blob being written under a temporary name (see ``BlobDir.writer``).
#[pyclass(frozen, module = "vna_native")]
struct BlobWriter {
    dir: Arc<blob::BlobDir>,
    temp: Mutex<Option<TempBlob>>,
}

impl BlobWriter {
    fn with<T>(&self, f: impl FnOnce(&mut Option<TempBlob>) -> io::Result<T>) -> io::Result<T> {
        let mut temp = self.temp.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut temp)
    }
}

fn closed() -> io::Error {
    io::Error::other("blob writer is closed")
}

#[pymethods]
impl BlobWriter {
    /// Append ``data`` (hashed while written).
    fn write(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        py.detach(|| self.with(|t| t.as_mut().ok_or_else(closed)?.write(data)))
            .map_err(os_error)
    }

    /// Fsync, publish under ``key`` (FileExistsError if it exists), remove the temporary name:
    /// (size, SHA-256 hex of the bytes written).
    fn commit(&self, py: Python<'_>, key: &str) -> PyResult<(u64, String)> {
        let written = py
            .detach(|| {
                self.with(|t| {
                    blob::check_key(key)?;
                    t.take().ok_or_else(closed)?.commit(&self.dir, key)
                })
            })
            .map_err(os_error)?;
        Ok((written.size, hex(&written).unwrap_or_default()))
    }

    /// Remove the temporary file unless committed; idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            let _ = self.with(|t| {
                t.take();
                Ok(())
            });
        });
    }
}

/// Write ``source`` under ``key`` to every store of ``dirs`` in parallel (with ``adopt`` the first
/// store takes the file over if it can, see ``BlobDir.adopt``); per store (the size written or the
/// OSError that stopped it -- FileExistsError: the key exists --, started ns, ended ns).
#[pyfunction]
fn write_replicas(
    py: Python<'_>,
    dirs: Vec<PyRef<'_, BlobDir>>,
    key: &str,
    source: PathBuf,
    adopt: bool,
) -> PyResult<Vec<(Py<PyAny>, u64, u64)>> {
    blob::check_key(key).map_err(os_error)?;
    let inner: Vec<Arc<blob::BlobDir>> = dirs.iter().map(|d| Arc::clone(&d.inner)).collect();
    let outcomes = py.detach(|| blob::write_replicas(&inner, key, &source, adopt));
    outcomes
        .into_iter()
        .map(|o| {
            let result = match o.result {
                Ok(w) => w.size.into_pyobject(py)?.into_any().unbind(),
                Err(e) => os_error(e).into_value(py).into_any(),
            };
            Ok((result, o.started_ns, o.ended_ns))
        })
        .collect()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<BlobDir>()?;
    m.add_class::<BlobWriter>()?;
    m.add_function(wrap_pyfunction!(write_replicas, m)?)?;
    Ok(())
}
