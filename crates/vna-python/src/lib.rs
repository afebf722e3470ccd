//! `vna_native`: the Python binding of vna-core. Python decides (association
//! acceptance, what to do with each spooled instance, logging); Rust owns the
//! socket and does all I/O with the GIL released.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod codec;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use vna_core::negotiate::SupportedContext;
use vna_core::pdu::AssociateRq;
use vna_core::server::{self, Config, Decision, Handler, Level, Peer, Server, StoreAnswer};

/// A C-STORE data set spooled to ``path`` (preamble, File Meta, data set as received).
#[pyclass(frozen, get_all, module = "vna_native")]
struct StoreRecord {
    path: String,
    sha256: String,
    size: u64,
    calling_ae: String,
    address: String,
    message_id: u16,
    sop_class_uid: String,
    sop_instance_uid: String,
    transfer_syntax_uid: String,
    move_originator: Option<String>,
    started_ns: u64,
    ended_ns: u64,
}

struct PyHandler {
    on_associate: Py<PyAny>,
    on_store: Py<PyAny>,
    on_log: Py<PyAny>,
    on_thread_done: Py<PyAny>,
}

const HANDLER_FAILED: u16 = 0xC211;

impl PyHandler {
    fn log_error(&self, py: Python<'_>, what: &str, err: &PyErr) {
        let _ = self.on_log.call1(py, (40, format!("{what}: {err}")));
    }
}

impl Handler for PyHandler {
    fn associate(&self, peer: &Peer, rq: &AssociateRq) -> Decision {
        Python::attach(|py| {
            let answer = self.on_associate.call1(
                py,
                (
                    rq.calling_ae(),
                    rq.called_ae(),
                    peer.address.clone(),
                    peer.port,
                ),
            );
            match answer.and_then(|v| v.extract::<Option<(u8, u8, u8)>>(py)) {
                Ok(None) => Decision::Accept,
                Ok(Some((a, b, c))) => Decision::Reject(a, b, c),
                Err(e) => {
                    self.log_error(py, "association policy failed", &e);
                    Decision::Reject(1, 1, 1)
                }
            }
        })
    }

    fn store(&self, r: &server::StoreRecord) -> StoreAnswer {
        Python::attach(|py| {
            let record = StoreRecord {
                path: r.path.to_string_lossy().into_owned(),
                sha256: r.sha256.clone(),
                size: r.size,
                calling_ae: r.calling_ae.clone(),
                address: r.address.clone(),
                message_id: r.message_id,
                sop_class_uid: r.sop_class_uid.clone(),
                sop_instance_uid: r.sop_instance_uid.clone(),
                transfer_syntax_uid: r.transfer_syntax_uid.clone(),
                move_originator: r.move_originator.clone(),
                started_ns: r.started_ns,
                ended_ns: r.ended_ns,
            };
            let answer = Py::new(py, record)
                .and_then(|rec| self.on_store.call1(py, (rec,)))
                .and_then(|v| v.extract::<(u16, Option<String>)>(py));
            match answer {
                Ok((status, comment)) => StoreAnswer { status, comment },
                Err(e) => {
                    self.log_error(py, "C-STORE handler failed", &e);
                    StoreAnswer {
                        status: HANDLER_FAILED,
                        comment: None,
                    }
                }
            }
        })
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Debug => 10,
            Level::Info => 20,
            Level::Warning => 30,
            Level::Error => 40,
        };
        Python::attach(|py| {
            let _ = self.on_log.call1(py, (level, message));
        });
    }

    fn run_thread(&self, body: &mut (dyn FnMut() + Send)) {
        // one interpreter thread state for the association's lifetime (thread-local state of the
        // callbacks survives between calls); the GIL is released while the thread does I/O
        Python::attach(|py| py.detach(body));
    }

    fn thread_done(&self) {
        Python::attach(|py| {
            if let Err(e) = self.on_thread_done.call0(py) {
                self.log_error(py, "association thread clean-up failed", &e);
            }
        });
    }
}

/// The native DICOM listener (C-ECHO, C-STORE receive); bound and accepting once constructed.
#[pyclass(frozen, module = "vna_native")]
struct Listener {
    server: Mutex<Option<Server<PyHandler>>>,
    listening: Arc<AtomicBool>,
    port: u16,
}

type ContextSpec = (String, Vec<String>, Option<(bool, bool)>, bool);

#[pymethods]
impl Listener {
    #[new]
    #[pyo3(signature = (*, host, port, reuse_port, max_pdu, max_associations, max_half_open, max_per_address,
                        acse_timeout, network_timeout,
                        spool_dir, implementation_class_uid, implementation_version, spool_implementation_uid,
                        spool_implementation_version, contexts, on_associate, on_store, on_log, on_thread_done))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        host: String,
        port: u16,
        reuse_port: bool,
        max_pdu: u32,
        max_associations: usize,
        max_half_open: usize,
        max_per_address: usize,
        acse_timeout: f64,
        network_timeout: f64,
        spool_dir: PathBuf,
        implementation_class_uid: String,
        implementation_version: String,
        spool_implementation_uid: String,
        spool_implementation_version: String,
        contexts: Vec<ContextSpec>,
        on_associate: Py<PyAny>,
        on_store: Py<PyAny>,
        on_log: Py<PyAny>,
        on_thread_done: Py<PyAny>,
    ) -> PyResult<Self> {
        let secs = |v: f64, name: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(PyValueError::new_err(format!(
                    "{name} must be a positive number of seconds"
                )))
            }
        };
        let mut supported = HashMap::new();
        for (abstract_syntax, transfer_syntaxes, roles, storage) in contexts {
            supported.insert(
                abstract_syntax,
                SupportedContext {
                    transfer_syntaxes,
                    roles,
                    storage,
                },
            );
        }
        let cfg = Config {
            host,
            port,
            reuse_port,
            max_pdu,
            max_associations: max_associations.max(1),
            max_half_open,
            max_per_address,
            acse_timeout: secs(acse_timeout, "acse_timeout")?,
            network_timeout: secs(network_timeout, "network_timeout")?,
            spool_dir,
            implementation_class_uid,
            implementation_version,
            spool_implementation_uid,
            spool_implementation_version,
            contexts: supported,
        };
        let handler = PyHandler {
            on_associate,
            on_store,
            on_log,
            on_thread_done,
        };
        let server = py.detach(|| Server::start(cfg, handler))?;
        let listening = server.listening_flag();
        let port = server.local_addr().port();
        Ok(Listener {
            server: Mutex::new(Some(server)),
            listening,
            port,
        })
    }

    /// The bound port.
    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// Connections of the port now: (half-open, associated); (0, 0) once stopped.
    fn connection_counts(&self) -> (usize, usize) {
        let server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        server
            .as_ref()
            .map(|s| s.connection_counts())
            .unwrap_or((0, 0))
    }

    /// True until ``stop`` closed the listening socket.
    #[getter]
    fn listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// Stop accepting, wait up to ``grace`` seconds for running C-STOREs, abort the associations
    /// and wait for their threads to end. Idempotent.
    fn stop(&self, py: Python<'_>, grace: f64) {
        let server = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut server) = server {
            let grace = Duration::from_secs_f64(if grace.is_finite() && grace > 0.0 {
                grace
            } else {
                0.0
            });
            py.detach(move || server.stop(grace));
        }
    }
}

/// The largest A-ASSOCIATE-RQ the listener reads.
#[pyfunction]
fn max_associate_rq() -> u32 {
    server::MAX_ASSOCIATE_RQ
}

#[pymodule]
fn vna_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Listener>()?;
    m.add_class::<StoreRecord>()?;
    m.add_function(wrap_pyfunction!(max_associate_rq, m)?)?;
    codec::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
