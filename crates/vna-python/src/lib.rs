//! `vna_native`: the Python binding of vna-core. Python decides (association
//! acceptance, what to do with each spooled instance, logging); Rust owns the
//! socket and does all I/O with the GIL released.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod blob;
mod codec;
mod part10;

use pyo3::exceptions::{PyStopIteration, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use vna_core::dimse::{self, Counts};
use vna_core::negotiate::{SupportedContext, UnknownStorage};
use vna_core::pdu::AssociateRq;
use vna_core::scu::TlsSettings;
use vna_core::server::{
    self, Config, CopyFault, CopyRef, Decision, Destination, FindAnswer, FindAnswers, Handler,
    Level, Peer, Retrieval, RetrievePlan, Server, StoreAnswer, SubOperation,
};

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

/// A C-FIND, C-GET, C-MOVE or N-ACTION request with its data set (identifier or action information).
#[pyclass(frozen, get_all, module = "vna_native")]
struct Request {
    kind: &'static str,
    calling_ae: String,
    address: String,
    port: u16,
    message_id: u16,
    priority: u16,
    sop_class_uid: String,
    transfer_syntax_uid: String,
    requested_sop_class_uid: String,
    requested_sop_instance_uid: String,
    move_destination: Option<String>,
    action_type_id: Option<u16>,
    data: Py<PyBytes>,
}

/// The status of a request whose Python handler raised (pynetdicom's statuses for that case).
fn handler_failed(kind: &str) -> u16 {
    match kind {
        "c-find" => 0xC311,
        "c-get" => 0xC411,
        "c-move" => 0xC511,
        _ => 0x0110,
    }
}

struct PyAnswers {
    iter: Option<Py<PyAny>>,
    on_log: Py<PyAny>,
}

impl FindAnswers for PyAnswers {
    fn next(&mut self) -> Option<FindAnswer> {
        let iter = self.iter.as_ref()?;
        Python::attach(|py| {
            let item = iter
                .call_method0(py, "__next__")
                .and_then(|v| v.extract::<(u16, Option<Vec<u8>>)>(py));
            match item {
                Ok((status, Some(identifier))) if status == 0xFF00 || status == 0xFF01 => {
                    Some(FindAnswer::Pending(identifier))
                }
                Ok((status, _)) => Some(FindAnswer::Final(status)),
                Err(e) if e.is_instance_of::<PyStopIteration>(py) => None,
                Err(e) => {
                    let _ = self
                        .on_log
                        .call1(py, (40, format!("C-FIND handler failed: {e}")));
                    Some(FindAnswer::Final(handler_failed("c-find")))
                }
            }
        })
    }

    fn close(&mut self) {
        if let Some(iter) = self.iter.take() {
            Python::attach(|py| {
                if let Ok(close) = iter.getattr(py, "close") {
                    if let Err(e) = close.call0(py) {
                        let _ = self
                            .on_log
                            .call1(py, (40, format!("C-FIND clean-up failed: {e}")));
                    }
                }
            });
        }
    }
}

type CopySpec = (String, String, u64);
type SubSpec = (String, String, String, Vec<CopySpec>);

fn copy_ref((path, sha256, size): CopySpec) -> CopyRef {
    CopyRef {
        path: PathBuf::from(path),
        sha256,
        size,
    }
}

/// A C-GET/C-MOVE planned by Python: the job object's methods are called in the association's thread.
/// The sub-operations' results are passed on together, before the next batch is asked for and at the end.
struct PyRetrieval {
    job: Py<PyAny>,
    on_log: Py<PyAny>,
    count: usize,
    destination: Option<Destination>,
    sent: Vec<(bool, u64, Option<u16>)>,
}

impl PyRetrieval {
    /// Pass the results gathered since the last call on (one call for all of them).
    fn flush_sent(&mut self) {
        if self.sent.is_empty() {
            return;
        }
        let results = std::mem::take(&mut self.sent);
        self.call("sent", |py, job| job.call_method1(py, "sent", (results,)));
    }

    fn call<T>(
        &self,
        what: &str,
        f: impl FnOnce(Python<'_>, &Py<PyAny>) -> PyResult<T>,
    ) -> Option<T> {
        Python::attach(|py| match f(py, &self.job) {
            Ok(v) => Some(v),
            Err(e) => {
                let _ = self
                    .on_log
                    .call1(py, (40, format!("retrieve handler {what} failed: {e}")));
                None
            }
        })
    }
}

impl Retrieval for PyRetrieval {
    fn count(&self) -> usize {
        self.count
    }

    fn destination(&self) -> Option<Destination> {
        self.destination.clone()
    }

    fn next_batch(&mut self, max: usize) -> Vec<SubOperation> {
        self.flush_sent();
        let specs = self
            .call("next_batch", |py, job| {
                job.call_method1(py, "next_batch", (max,))?
                    .extract::<Vec<SubSpec>>(py)
            })
            .unwrap_or_default();
        specs
            .into_iter()
            .map(
                |(sop_class_uid, sop_instance_uid, transfer_syntax_uid, copies)| SubOperation {
                    sop_class_uid,
                    sop_instance_uid,
                    transfer_syntax_uid,
                    copies: copies.into_iter().map(copy_ref).collect(),
                },
            )
            .collect()
    }

    fn bad_copy(&mut self, position: usize, index: usize, why: &str, fault: CopyFault) {
        let fault = match fault {
            CopyFault::Corrupt => "corrupt",
            CopyFault::Missing => "missing",
            CopyFault::Unreadable => "unreadable",
        };
        self.call("bad_copy", |py, job| {
            job.call_method1(py, "bad_copy", (position, index, why, fault))
        });
    }

    fn fallback(&mut self, position: usize) -> Option<CopyRef> {
        self.call("fallback", |py, job| {
            job.call_method1(py, "fallback", (position,))?
                .extract::<Option<CopySpec>>(py)
        })?
        .map(copy_ref)
    }

    fn convert(&mut self, position: usize, transfer_syntax: &str) -> Option<CopyRef> {
        self.call("convert", |py, job| {
            job.call_method1(py, "convert", (position, transfer_syntax))?
                .extract::<Option<CopySpec>>(py)
        })?
        .map(copy_ref)
    }

    fn sent(&mut self, ok: bool, size: u64, status: Option<u16>) {
        self.sent.push((ok, size, status));
    }

    fn failed_identifier(&mut self, failed: &[String]) -> Vec<u8> {
        let failed = failed.to_vec();
        self.call("failed_identifier", |py, job| {
            job.call_method1(py, "failed_identifier", (failed,))?
                .extract::<Vec<u8>>(py)
        })
        .unwrap_or_default()
    }

    fn close(&mut self) {
        self.flush_sent();
        self.call("close", |py, job| job.call_method0(py, "close"));
    }
}

type CountsSpec = (Option<u16>, u16, u16, u16);
type AnswerSpec = (u16, Option<CountsSpec>, Option<Vec<u8>>);
/// (CA bundle path or None, (certificate path, key path) or None).
type TlsSpec = (Option<String>, Option<(String, String)>);
type DestinationSpec = (
    String,
    u16,
    String,
    String,
    Vec<(String, Vec<String>)>,
    Option<TlsSpec>,
);

fn plan(py: Python<'_>, answer: Py<PyAny>, on_log: &Py<PyAny>) -> PyResult<RetrievePlan> {
    if let Ok((status, counts, identifier)) = answer.extract::<AnswerSpec>(py) {
        let counts = counts.map(|(remaining, completed, failed, warning)| Counts {
            remaining,
            completed,
            failed,
            warning,
        });
        return Ok(RetrievePlan::Answer(status, counts, identifier));
    }
    let count = answer.call_method0(py, "count")?.extract::<usize>(py)?;
    let destination = answer
        .call_method0(py, "destination")?
        .extract::<Option<DestinationSpec>>(py)?
        .map(
            |(host, port, called_ae, calling_ae, contexts, tls)| Destination {
                host,
                port,
                called_ae,
                calling_ae,
                contexts,
                tls: tls.map(|(ca_file, identity)| TlsSettings {
                    ca_file: ca_file.map(PathBuf::from),
                    identity: identity.map(|(cert, key)| (cert.into(), key.into())),
                }),
            },
        );
    Ok(RetrievePlan::Run(Box::new(PyRetrieval {
        job: answer,
        on_log: on_log.clone_ref(py),
        count,
        destination,
        sent: Vec::new(),
    })))
}

struct PyHandler {
    on_associate: Py<PyAny>,
    on_store: Py<PyAny>,
    on_request: Py<PyAny>,
    on_log: Py<PyAny>,
    on_thread_done: Py<PyAny>,
}

const HANDLER_FAILED: u16 = 0xC211;

impl PyHandler {
    fn log_error(&self, py: Python<'_>, what: &str, err: &PyErr) {
        let _ = self.on_log.call1(py, (40, format!("{what}: {err}")));
    }

    fn call_request(
        &self,
        py: Python<'_>,
        kind: &'static str,
        r: &server::Request<'_>,
    ) -> PyResult<Py<PyAny>> {
        let c = r.command;
        let request = Request {
            kind,
            calling_ae: r.calling_ae.to_string(),
            address: r.address.to_string(),
            port: r.port,
            message_id: c.message_id,
            priority: c.priority,
            sop_class_uid: r.abstract_syntax.to_string(),
            transfer_syntax_uid: r.transfer_syntax.to_string(),
            requested_sop_class_uid: c.requested_sop_class.clone(),
            requested_sop_instance_uid: c.requested_sop_instance.clone(),
            move_destination: c.move_destination.clone(),
            action_type_id: c.action_type_id,
            data: PyBytes::new(py, r.data).unbind(),
        };
        let request = Py::new(py, request)?;
        self.on_request.call1(py, (request,))
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

    fn find(&self, request: &server::Request<'_>) -> Box<dyn FindAnswers> {
        let iter = Python::attach(|py| match self.call_request(py, "c-find", request) {
            Ok(v) => v.bind(py).try_iter().map(|it| it.into_any().unbind()).ok(),
            Err(e) => {
                self.log_error(py, "C-FIND handler failed", &e);
                None
            }
        });
        let on_log = Python::attach(|py| self.on_log.clone_ref(py));
        match iter {
            Some(iter) => Box::new(PyAnswers {
                iter: Some(iter),
                on_log,
            }),
            None => Box::new(server::IntoAnswers::into_answers(std::iter::once(
                FindAnswer::Final(handler_failed("c-find")),
            ))),
        }
    }

    fn retrieve(&self, request: &server::Request<'_>) -> RetrievePlan {
        let kind = if request.command.command_field == dimse::C_GET_RQ {
            "c-get"
        } else {
            "c-move"
        };
        Python::attach(|py| {
            let planned = self
                .call_request(py, kind, request)
                .and_then(|answer| plan(py, answer, &self.on_log));
            match planned {
                Ok(plan) => plan,
                Err(e) => {
                    self.log_error(py, &format!("{} handler failed", kind.to_uppercase()), &e);
                    RetrievePlan::Answer(handler_failed(kind), None, None)
                }
            }
        })
    }

    fn action(&self, request: &server::Request<'_>) -> (u16, Option<Vec<u8>>) {
        Python::attach(|py| {
            let answer = self
                .call_request(py, "n-action", request)
                .and_then(|v| v.extract::<(u16, Option<Vec<u8>>)>(py));
            match answer {
                Ok(answer) => answer,
                Err(e) => {
                    self.log_error(py, "N-ACTION handler failed", &e);
                    (handler_failed("n-action"), None)
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
/// (our transfer syntaxes, roles or None, abstract syntaxes never accepted as storage)
type UnknownSpec = (Vec<String>, Option<(bool, bool)>, Vec<String>);

#[pymethods]
impl Listener {
    #[new]
    #[pyo3(signature = (*, host, port, reuse_port, max_pdu, max_associations, max_half_open, max_per_address,
                        acse_timeout, network_timeout, dimse_timeout,
                        spool_dir, implementation_class_uid, implementation_version, spool_implementation_uid,
                        spool_implementation_version, contexts, on_associate, on_store, on_request, on_log,
                        on_thread_done, unknown_storage = None))]
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
        dimse_timeout: f64,
        spool_dir: PathBuf,
        implementation_class_uid: String,
        implementation_version: String,
        spool_implementation_uid: String,
        spool_implementation_version: String,
        contexts: Vec<ContextSpec>,
        on_associate: Py<PyAny>,
        on_store: Py<PyAny>,
        on_request: Py<PyAny>,
        on_log: Py<PyAny>,
        on_thread_done: Py<PyAny>,
        unknown_storage: Option<UnknownSpec>,
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
            dimse_timeout: secs(dimse_timeout, "dimse_timeout")?,
            spool_dir,
            implementation_class_uid,
            implementation_version,
            spool_implementation_uid,
            spool_implementation_version,
            contexts: supported,
            unknown_storage: unknown_storage.map(|(transfer_syntaxes, roles, refused)| {
                UnknownStorage {
                    context: SupportedContext {
                        transfer_syntaxes,
                        roles,
                        storage: true,
                    },
                    refused: refused.into_iter().collect(),
                }
            }),
        };
        let handler = PyHandler {
            on_associate,
            on_store,
            on_request,
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
    m.add_class::<Request>()?;
    m.add_function(wrap_pyfunction!(max_associate_rq, m)?)?;
    codec::register(m)?;
    blob::register(m)?;
    part10::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
