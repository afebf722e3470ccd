//! The listener: one thread accepts, one thread serves each association
//! (A-ASSOCIATE negotiation, C-ECHO, C-STORE receive to a spool file, C-FIND,
//! C-GET, C-MOVE, C-CANCEL, N-ACTION, release, abort).
//!
//! The embedding program decides through [`Handler`]: whether to accept an
//! association, what to do with each spooled instance, the matches of a C-FIND
//! (asked for one by one, a C-CANCEL checked between them), the instances of a
//! C-GET/C-MOVE and their candidate copies ([`Retrieval`]; each copy's SHA-256 is
//! checked before its last byte goes out, by [`crate::send`]; a C-MOVE's destination
//! is reached with [`crate::scu`]), the answer to an N-ACTION, where log lines go.
//! A Q/R or N-ACTION request's data set is at most [`MAX_REQUEST_DATA`] bytes.
//! Bounds: an A-ASSOCIATE-RQ is at most [`MAX_ASSOCIATE_RQ`] bytes and must
//! arrive within `acse_timeout` of the connection (ARTIM); a P-DATA-TF is at
//! most the Maximum Length we announced; every other PDU is at most
//! [`MAX_SMALL_PDU`] bytes; a read waits at most `network_timeout`. Anything
//! malformed aborts its association with one log line.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::dimse::{self, Command};
use crate::negotiate::{negotiate, Accepted, SupportedContext, UnknownStorage};
use crate::pdu::{self, AssociateAc, AssociateRq};
use crate::send::hex;
use crate::{scu, send};

/// The largest A-ASSOCIATE-RQ accepted (128 contexts, each with every transfer syntax, and a
/// 64 KiB user identity fit), as the Python receiver's bound.
pub const MAX_ASSOCIATE_RQ: u32 = 512 * 1024;
/// Refusals of a kind from one address logged once per this window; the rest are counted.
const REFUSAL_WINDOW: Duration = Duration::from_secs(60);
/// The largest A-RELEASE-RQ/RP or A-ABORT accepted (they are 4 bytes long).
pub const MAX_SMALL_PDU: u32 = 64;
/// The P-DATA-TF bound when we announce no maximum (0).
pub const MAX_UNLIMITED_PDATA: u32 = 16 * 1024 * 1024;
/// The largest command set accepted (commands are a few hundred bytes).
pub const MAX_COMMAND: usize = 64 * 1024;

/// The largest data set of a C-FIND/C-GET/C-MOVE/N-ACTION request accepted (identifiers are small).
pub const MAX_REQUEST_DATA: usize = 4 * 1024 * 1024;

const VERIFICATION: &str = "1.2.840.10008.1.1";
/// Storage Commitment Push Model SOP Class.
pub const COMMITMENT: &str = "1.2.840.10008.1.20.1";
/// Patient Root and Study Root C-FIND, C-GET and C-MOVE information models.
pub const FIND_MODELS: [&str; 2] = ["1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1"];
pub const GET_MODELS: [&str; 2] = ["1.2.840.10008.5.1.4.1.2.1.3", "1.2.840.10008.5.1.4.1.2.2.3"];
pub const MOVE_MODELS: [&str; 2] = ["1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.2.2"];
const PENDING: u16 = 0xFF00;
/// Sub-operations asked of a [`Retrieval`] at once (one call into the embedding program per batch).
pub const RETRIEVE_BATCH: usize = 64;
const CANCEL: u16 = 0xFE00;
const SUBOPS_FAILED: u16 = 0xA702;
const SUBOPS_WARNING: u16 = 0xB000;

/// Listener settings and the acceptor's contexts.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub reuse_port: bool,
    /// Our Maximum Length Received (0: unlimited, bounded by [`MAX_UNLIMITED_PDATA`]).
    pub max_pdu: u32,
    pub max_associations: usize,
    /// Connections not yet associated (0: unlimited); one more is closed at once.
    pub max_half_open: usize,
    /// Connections one peer address may hold, associated or not (0: unlimited); one more is closed at once.
    pub max_per_address: usize,
    pub acse_timeout: Duration,
    pub network_timeout: Duration,
    /// The longest a C-STORE-RSP of a sub-operation may take.
    pub dimse_timeout: Duration,
    pub spool_dir: PathBuf,
    /// What our A-ASSOCIATE-AC announces.
    pub implementation_class_uid: String,
    pub implementation_version: String,
    /// What the File Meta of a spooled data set names as its implementation.
    pub spool_implementation_uid: String,
    pub spool_implementation_version: String,
    pub contexts: HashMap<String, SupportedContext>,
    /// `dicom.accept_unknown_storage_classes`: how other abstract syntaxes are accepted as storage.
    pub unknown_storage: Option<UnknownStorage>,
}

/// The peer of an association.
#[derive(Debug, Clone)]
pub struct Peer {
    pub address: String,
    pub port: u16,
}

/// The embedding program's answer to an A-ASSOCIATE-RQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Accept,
    /// An A-ASSOCIATE-RJ with (result, source, reason), PS3.8 9.3.4.
    Reject(u8, u8, u8),
}

/// A C-STORE data set spooled to `path` and hashed while spooled.
#[derive(Debug, Clone)]
pub struct StoreRecord {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub calling_ae: String,
    pub address: String,
    pub message_id: u16,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub move_originator: Option<String>,
    pub started_ns: u64,
    pub ended_ns: u64,
}

/// The status of a C-STORE-RSP and its Error Comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreAnswer {
    pub status: u16,
    pub comment: Option<String>,
}

/// A C-FIND, C-GET, C-MOVE or N-ACTION request and its data set (identifier or action information).
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub calling_ae: &'a str,
    pub address: &'a str,
    pub port: u16,
    pub command: &'a Command,
    /// The presentation context's abstract syntax and transfer syntax (the data set's encoding).
    pub abstract_syntax: &'a str,
    pub transfer_syntax: &'a str,
    pub data: &'a [u8],
}

/// One C-FIND response: a match (Pending, its encoded identifier) or the final status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindAnswer {
    Pending(Vec<u8>),
    Final(u16),
}

/// The matches of a C-FIND, asked for one at a time between checks for a C-CANCEL.
pub trait FindAnswers {
    /// The next answer; None: the matches are exhausted (final Success).
    fn next(&mut self) -> Option<FindAnswer>;
    /// The C-FIND ended (answered, cancelled or cut off): release what the answers hold.
    fn close(&mut self) {}
}

/// A stored copy the native side may read: the file, its expected SHA-256 (hex) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRef {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// One C-STORE sub-operation of a C-GET/C-MOVE: the instance and its candidate copies, best first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubOperation {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// The stored transfer syntax.
    pub transfer_syntax_uid: String,
    pub copies: Vec<CopyRef>,
}

/// Why a candidate copy was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFault {
    /// Its size or SHA-256 differs from the recorded ones.
    Corrupt,
    /// The file does not exist.
    Missing,
    /// It could not be read (an I/O error).
    Unreadable,
}

/// Where a C-MOVE sends: an association we request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub host: String,
    pub port: u16,
    pub called_ae: String,
    pub calling_ae: String,
    /// (abstract syntax, transfer syntaxes) to propose.
    pub contexts: Vec<(String, Vec<String>)>,
    /// Associate over TLS with these settings (None: plain TCP).
    pub tls: Option<scu::TlsSettings>,
}

/// A C-GET or C-MOVE the embedding program selected instances for.
///
/// Instances are handed out in batches, in the order they are sent; an instance's *position* is its
/// rank in that order (0 for the first instance of the first batch). The per-instance calls
/// (`bad_copy`, `fallback`, `convert`) name the instance being sent by its position; it always
/// belongs to the last batch handed out.
pub trait Retrieval {
    /// The number of sub-operations announced (at least 1).
    fn count(&self) -> usize;
    /// The destination of a C-MOVE (None for a C-GET).
    fn destination(&self) -> Option<Destination> {
        None
    }
    /// The next instances to send, at most `max` (at least one unless done); empty when done.
    /// Asked again only once every instance of the previous batch has been sent.
    fn next_batch(&mut self, max: usize) -> Vec<SubOperation>;
    /// Copy `index` of the instance at `position` failed (`why`): the next candidate is tried.
    fn bad_copy(&mut self, position: usize, index: usize, why: &str, fault: CopyFault);
    /// A verified copy of the instance at `position` by the embedding program's own means when none
    /// of the candidates verified (valid until another position is named or the next batch is
    /// asked for); None: the sub-operation fails.
    fn fallback(&mut self, position: usize) -> Option<CopyRef>;
    /// A verified copy of the instance at `position` re-encoded in `transfer_syntax` (a Part 10 file,
    /// valid as a fallback copy is); None: not possible (the sub-operation fails).
    fn convert(&mut self, position: usize, transfer_syntax: &str) -> Option<CopyRef>;
    /// The result of the current sub-operation (`ok`: Success or Warning; `size`: bytes sent).
    fn sent(&mut self, ok: bool, size: u64, status: Option<u16>);
    /// The identifier of a response listing `failed` SOP Instance UIDs, in the request's transfer syntax.
    fn failed_identifier(&mut self, failed: &[String]) -> Vec<u8>;
    /// The retrieve ended (answered, cancelled or cut off).
    fn close(&mut self) {}
}

/// How the embedding program answers a C-GET/C-MOVE.
pub enum RetrievePlan {
    /// A final response at once: status, counts, identifier.
    Answer(u16, Option<dimse::Counts>, Option<Vec<u8>>),
    Run(Box<dyn Retrieval>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warning,
    Error,
}

/// The embedding program's decisions; called from the association threads.
pub trait Handler: Send + Sync + 'static {
    /// Accept or reject an association whose request is well formed.
    fn associate(&self, peer: &Peer, rq: &AssociateRq) -> Decision;
    /// Take a spooled instance (the file may be adopted: moved or linked); return the C-STORE status.
    /// The spool file is removed afterwards if it is still there.
    fn store(&self, record: &StoreRecord) -> StoreAnswer;
    /// Answer a C-FIND: its matches, asked for one by one.
    fn find(&self, request: &Request<'_>) -> Box<dyn FindAnswers> {
        let _ = request;
        Box::new(std::iter::once(FindAnswer::Final(0xC000)).into_answers())
    }
    /// Plan a C-GET or C-MOVE.
    fn retrieve(&self, request: &Request<'_>) -> RetrievePlan {
        let _ = request;
        RetrievePlan::Answer(SUBOPS_FAILED, None, None)
    }
    /// Answer an N-ACTION: status and Action Reply.
    fn action(&self, request: &Request<'_>) -> (u16, Option<Vec<u8>>) {
        let _ = request;
        (0x0123, None)
    }
    /// One log line.
    fn log(&self, level: Level, message: &str);
    /// Run an association thread's whole body (e.g. inside a per-thread interpreter state).
    fn run_thread(&self, body: &mut (dyn FnMut() + Send)) {
        body()
    }
    /// The association thread is ending (after its last `store`).
    fn thread_done(&self) {}
}

/// Answers from an iterator (closing does nothing).
pub struct IterAnswers<I>(I);

impl<I: Iterator<Item = FindAnswer>> FindAnswers for IterAnswers<I> {
    fn next(&mut self) -> Option<FindAnswer> {
        self.0.next()
    }
}

/// Turn an iterator of answers into [`FindAnswers`].
pub trait IntoAnswers: Iterator<Item = FindAnswer> + Sized {
    fn into_answers(self) -> IterAnswers<Self> {
        IterAnswers(self)
    }
}

impl<I: Iterator<Item = FindAnswer>> IntoAnswers for I {}

struct Shared<H: Handler> {
    cfg: Config,
    handler: H,
    stopping: AtomicBool,
    /// Connection threads running.
    active: AtomicUsize,
    /// Associations requested (A-ASSOCIATE-RQ received) and not yet ended: what max_associations bounds.
    associations: AtomicUsize,
    inflight: Mutex<usize>,
    idle: Condvar,
    conns: Mutex<HashMap<u64, TcpStream>>,
    seq: AtomicU64,
    limits: Mutex<Limits>,
}

/// Connections counted per peer address and while half-open, and the refusal log's windows.
#[derive(Default)]
struct Limits {
    per_address: HashMap<IpAddr, usize>,
    half_open: usize,
    associated: usize,
    refusals: HashMap<(IpAddr, String), (Instant, u64)>,
}

/// A running listener.
pub struct Server<H: Handler> {
    shared: Arc<Shared<H>>,
    local: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
    listening: Arc<AtomicBool>,
}

fn bind(cfg: &Config) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr: SocketAddr = format!("{}:{}", cfg.host, cfg.port).parse().or_else(|_| {
        std::net::ToSocketAddrs::to_socket_addrs(&(cfg.host.as_str(), cfg.port))?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))
    })?;
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if cfg.reuse_port {
        sock.set_reuse_port(true)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(128)?;
    Ok(sock.into())
}

impl<H: Handler> Server<H> {
    /// Bind and start accepting in a background thread.
    pub fn start(cfg: Config, handler: H) -> io::Result<Self> {
        let listener = bind(&cfg)?;
        let local = listener.local_addr()?;
        let shared = Arc::new(Shared {
            cfg,
            handler,
            stopping: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            associations: AtomicUsize::new(0),
            inflight: Mutex::new(0),
            idle: Condvar::new(),
            conns: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            limits: Mutex::new(Limits::default()),
        });
        let listening = Arc::new(AtomicBool::new(true));
        let (s, l) = (shared.clone(), listening.clone());
        let acceptor = std::thread::Builder::new()
            .name(format!("vna-native-acceptor-{}", local.port()))
            .spawn(move || {
                accept_loop(&s, &listener);
                l.store(false, Ordering::SeqCst);
            })?;
        Ok(Server {
            shared,
            local,
            acceptor: Some(acceptor),
            listening,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// True until `stop` closed the listening socket.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// The flag `listening` reads, to share with another owner.
    pub fn listening_flag(&self) -> Arc<AtomicBool> {
        self.listening.clone()
    }

    /// Connections now: (half-open, associated).
    pub fn connection_counts(&self) -> (usize, usize) {
        let limits = lock(&self.shared.limits);
        (limits.half_open, limits.associated)
    }

    /// The number of association threads running.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Stop accepting, wait up to `grace` for running C-STOREs, then abort every association
    /// and wait (a few seconds at most) for their threads to end.
    pub fn stop(&mut self, grace: Duration) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let deadline = Instant::now() + grace;
        let mut inflight = lock(&self.shared.inflight);
        while *inflight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            inflight = self
                .shared
                .idle
                .wait_timeout(inflight, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        drop(inflight);
        for (_, mut conn) in lock(&self.shared.conns).drain() {
            let _ = conn.write_all(&pdu::encode_abort(2, 0));
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl<H: Handler> Drop for Server<H> {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.stop(Duration::ZERO);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop<H: Handler>(shared: &Arc<Shared<H>>, listener: &TcpListener) {
    let fd = listener.as_raw_fd();
    while !shared.stopping.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the listener's open descriptor.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        if n <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, addr)) => {
                if admit(shared, addr.ip()) {
                    spawn_association(shared, stream, addr);
                } // else dropped: closed before anything is read
            }
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                shared
                    .handler
                    .log(Level::Warning, &format!("accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Count a new connection from `ip` (half-open), or refuse it with a rate-limited log line.
fn admit<H: Handler>(shared: &Shared<H>, ip: IpAddr) -> bool {
    let cfg = &shared.cfg;
    let mut limits = lock(&shared.limits);
    let n = limits.per_address.get(&ip).copied().unwrap_or(0);
    let refusal = if cfg.max_per_address > 0 && n >= cfg.max_per_address {
        Some(("dicom.max_connections_per_address", n))
    } else if cfg.max_half_open > 0 && limits.half_open >= cfg.max_half_open {
        Some(("dicom.max_half_open_connections", limits.half_open))
    } else {
        None
    };
    let Some((setting, count)) = refusal else {
        *limits.per_address.entry(ip).or_insert(0) += 1;
        limits.half_open += 1;
        return true;
    };
    drop(limits);
    say(
        shared,
        ip,
        Level::Warning,
        &format!("connection refused: {count} connections ({setting})"),
    );
    false
}

/// One log line about peer `ip`, rate-limited: the first line of its kind (the text without its digits)
/// from an address in a window is written, the rest are counted into the next one.
fn say<H: Handler>(shared: &Shared<H>, ip: IpAddr, level: Level, line: &str) {
    let kind: String = line
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(120)
        .collect();
    let now = Instant::now();
    let hidden = {
        let mut limits = lock(&shared.limits);
        if limits.refusals.len() > 4096 {
            limits
                .refusals
                .retain(|_, (start, _)| now.duration_since(*start) < REFUSAL_WINDOW);
        }
        let entry = limits
            .refusals
            .entry((ip, kind))
            .or_insert((now - REFUSAL_WINDOW, 0));
        if now.duration_since(entry.0) < REFUSAL_WINDOW {
            entry.1 += 1;
            return;
        }
        std::mem::replace(entry, (now, 0)).1
    };
    let more = if hidden > 0 {
        format!(
            " ({hidden} more like it from this address in the last {} s)",
            REFUSAL_WINDOW.as_secs()
        )
    } else {
        String::new()
    };
    shared
        .handler
        .log(level, &format!("DICOM peer {ip}: {line}{more}"));
}

/// The connection from `ip` ended; `half_open`: it never took an association slot.
fn release<H: Handler>(shared: &Shared<H>, ip: IpAddr, half_open: bool) {
    let mut limits = lock(&shared.limits);
    if let Some(n) = limits.per_address.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            limits.per_address.remove(&ip);
        }
    }
    if half_open {
        limits.half_open -= 1;
    } else {
        limits.associated -= 1;
    }
}

fn spawn_association<H: Handler>(shared: &Arc<Shared<H>>, stream: TcpStream, addr: SocketAddr) {
    let id = shared.seq.fetch_add(1, Ordering::SeqCst);
    if let Ok(clone) = stream.try_clone() {
        lock(&shared.conns).insert(id, clone);
    }
    shared.active.fetch_add(1, Ordering::SeqCst);
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("vna-native-assoc-{id}"))
        .spawn(move || {
            let mut stream = Some(stream);
            let shared = &s;
            let mut body = || {
                let Some(stream) = stream.take() else { return };
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Association::new(shared, stream, addr, id).run()
                }));
                if result.is_err() {
                    shared.handler.log(
                        Level::Error,
                        &format!("association with {} ended by an internal error", addr.ip()),
                    );
                }
                shared.handler.thread_done();
            };
            s.handler.run_thread(&mut body);
            lock(&s.conns).remove(&id);
            s.active.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        lock(&shared.conns).remove(&id);
        release(shared, addr.ip(), true);
        shared.active.fetch_sub(1, Ordering::SeqCst);
        shared.handler.log(
            Level::Error,
            &format!("cannot start an association thread: {e}"),
        );
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Why an association ends early.
enum End {
    /// The peer closed the connection or sent A-ABORT: nothing to send.
    Closed(String),
    /// A protocol error or a timeout: send A-ABORT (source 2, reason) and log.
    Abort(u8, String),
    /// Close without an A-ABORT (nothing can be sent yet) and log.
    Refuse(String),
    /// Released normally.
    Released,
}

struct Receiving {
    context_id: u8,
    command: Command,
    transfer_syntax: String,
    /// The spool file, unless the store was refused before one was made.
    spool: Option<(File, PathBuf)>,
    sha: Sha256,
    size: u64,
    started_ns: u64,
    failure: Option<io::Error>,
}

/// The data set of a Q/R or N-ACTION request being received (in memory, bounded).
struct Collecting {
    context_id: u8,
    command: Command,
    data: Vec<u8>,
}

/// What a check for a C-CANCEL found.
enum Incoming {
    Nothing,
    Cancel,
}

/// What an association did, for its one log line (as the Python receiver's association log).
#[derive(Default)]
struct Activity {
    started: Option<Instant>,
    /// Services used and how often, by lower-case name.
    services: std::collections::BTreeMap<&'static str, u32>,
    stored: u32,
    sent: u32,
    failures: u32,
}

/// True for a status the association log counts as a failure (not Success, Pending, Cancel, Warning).
fn failed_status(status: u16) -> bool {
    !matches!(status, 0 | PENDING | CANCEL | 0xFF01) && status >> 12 != 0xB
}

struct Association<'a, H: Handler> {
    shared: &'a Shared<H>,
    stream: TcpStream,
    addr: SocketAddr,
    id: u64,
    body: Vec<u8>,
    calling_ae: String,
    peer_max_pdu: u32,
    accepted: HashMap<u8, Accepted>,
    command: Vec<u8>,
    command_cx: Option<u8>,
    receiving: Option<Receiving>,
    collecting: Option<Collecting>,
    spool_seq: u64,
    /// True once a C-CANCEL-RQ of the running operation arrived.
    cancelled: bool,
    /// Sends the C-STORE sub-operations of a C-GET (made at the first one).
    sender: Option<send::Sender>,
    activity: Activity,
    /// True once this connection counts as an association (its A-ASSOCIATE-RQ arrived).
    counted: bool,
    /// True until the connection took an association slot (counted half-open until then).
    half_open: bool,
}

impl<H: Handler> Drop for Association<'_, H> {
    fn drop(&mut self) {
        if self.counted {
            self.shared.associations.fetch_sub(1, Ordering::SeqCst);
        }
        release(self.shared, self.addr.ip(), self.half_open);
    }
}

impl<'a, H: Handler> Association<'a, H> {
    fn new(shared: &'a Shared<H>, stream: TcpStream, addr: SocketAddr, id: u64) -> Self {
        Association {
            shared,
            stream,
            addr,
            id,
            body: Vec::new(),
            calling_ae: String::new(),
            peer_max_pdu: 0,
            accepted: HashMap::new(),
            command: Vec::new(),
            command_cx: None,
            receiving: None,
            collecting: None,
            cancelled: false,
            sender: None,
            activity: Activity::default(),
            spool_seq: 0,
            counted: false,
            half_open: true,
        }
    }

    fn log(&self, level: Level, message: &str) {
        self.shared.handler.log(level, message);
    }

    fn run(mut self) {
        let _ = self.stream.set_nodelay(true);
        let (end, associated) = match self.negotiate() {
            Ok(true) => (self.serve(), true),
            Ok(false) => return,
            Err(end) => (end, false),
        };
        self.abandon();
        let ip = self.addr.ip();
        if associated {
            let how = match &end {
                End::Released => "released",
                End::Closed(why) if why == "aborted by the peer" => "aborted",
                End::Abort(..) => "aborted",
                _ => "closed",
            };
            self.log_activity(how);
        }
        match end {
            End::Released => {}
            End::Closed(why) => {
                if !why.is_empty() {
                    let line = format!("association from {} ended: {why}", self.calling_ae);
                    say(self.shared, ip, Level::Info, &line);
                }
            }
            End::Refuse(why) => say(
                self.shared,
                ip,
                Level::Warning,
                &format!("connection closed: {why}"),
            ),
            End::Abort(reason, why) => {
                let what = if associated {
                    "association aborted"
                } else {
                    "connection closed"
                };
                say(self.shared, ip, Level::Warning, &format!("{what}: {why}"));
                let _ = self.stream.write_all(&pdu::encode_abort(2, reason));
            }
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// The association's one INFO line: who, how it ended, how long, the services and the counts.
    fn log_activity(&self, how: &str) {
        let a = &self.activity;
        let secs = a.started.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        let used = if a.services.is_empty() {
            "no service".to_string()
        } else {
            a.services
                .iter()
                .map(|(op, n)| format!("{} {n}", op.to_uppercase()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        self.log(
            Level::Info,
            &format!(
                "association from {} ({}:{}) {how} after {secs:.2} s: {used}; stored {}, sent {}, failures {}",
                self.calling_ae,
                self.addr.ip(),
                self.addr.port(),
                a.stored,
                a.sent,
                a.failures
            ),
        );
    }

    fn used(&mut self, op: &'static str) {
        *self.activity.services.entry(op).or_insert(0) += 1;
    }

    /// Read one PDU into `self.body`; `deadline` bounds the whole PDU (ARTIM), else each read waits
    /// at most `network_timeout`.
    fn read_pdu(&mut self, deadline: Option<Instant>, associated: bool) -> Result<u8, End> {
        let mut head = [0u8; 6];
        self.read_exact(&mut head, deadline, true)?;
        let (kind, len) = pdu::parse_header(&head);
        let cap = match kind {
            pdu::A_ASSOCIATE_RQ if !associated => MAX_ASSOCIATE_RQ,
            // as the Python receiver: the announced maximum plus a PDV item header's worth of slack
            pdu::P_DATA_TF if associated => match self.shared.cfg.max_pdu {
                0 => MAX_UNLIMITED_PDATA,
                n => n.saturating_add(6),
            },
            pdu::A_RELEASE_RQ | pdu::A_ABORT if associated => MAX_SMALL_PDU,
            pdu::A_ABORT => MAX_SMALL_PDU,
            pdu::A_ASSOCIATE_RQ..=pdu::A_ABORT if associated => {
                return Err(End::Abort(2, format!("unexpected {}", pdu::pdu_name(kind))));
            }
            pdu::A_ASSOCIATE_RQ..=pdu::A_ABORT => {
                let name = pdu::pdu_name(kind);
                return Err(End::Abort(
                    2,
                    format!("{name} before the association was established"),
                ));
            }
            _ => {
                return Err(End::Abort(
                    1,
                    format!("not a DICOM PDU (type 0x{kind:02X})"),
                ))
            }
        };
        if len > cap {
            let name = pdu::pdu_name(kind);
            let bound = if associated {
                "(dicom.max_pdu)"
            } else {
                "before association"
            };
            return Err(End::Abort(
                6,
                format!("{name} of {len} bytes, more than the {cap} allowed {bound}"),
            ));
        }
        let mut body = std::mem::take(&mut self.body);
        body.clear();
        body.reserve_exact(len as usize); // never more than the bound checked above
        body.resize(len as usize, 0);
        let read = self.read_exact(&mut body, deadline, false);
        self.body = body;
        read?;
        Ok(kind)
    }

    fn read_exact(
        &mut self,
        buf: &mut [u8],
        deadline: Option<Instant>,
        first: bool,
    ) -> Result<(), End> {
        let timeout = self.shared.cfg.network_timeout;
        let mut pos = 0usize;
        while pos < buf.len() {
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => timeout,
            };
            if wait.is_zero() {
                return Err(self.artim_expired());
            }
            let _ = self.stream.set_read_timeout(Some(wait));
            match self.stream.read(&mut buf[pos..]) {
                Ok(0) => {
                    let why = if first && pos == 0 {
                        ""
                    } else {
                        "connection closed mid-PDU"
                    };
                    return Err(End::Closed(why.into()));
                }
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    if deadline.is_some() {
                        return Err(self.artim_expired());
                    }
                    let secs = timeout.as_secs_f64();
                    return Err(End::Abort(
                        0,
                        format!("no data for {secs:.0} s (dicom.network_timeout)"),
                    ));
                }
                Err(e) => return Err(End::Closed(format!("connection error: {e}"))),
            }
        }
        Ok(())
    }

    fn artim_expired(&self) -> End {
        let secs = self.shared.cfg.acse_timeout.as_secs_f64();
        End::Refuse(format!(
            "no A-ASSOCIATE within {secs:.0} s (dicom.acse_timeout)"
        ))
    }

    /// The type of a PDU the requestor sent before our A-ASSOCIATE-AC (it must wait for it), if any.
    fn pdu_sent_early(&self) -> Option<u8> {
        let mut first = [0u8; 1];
        let _ = self.stream.set_nonblocking(true);
        let early = match self.stream.peek(&mut first) {
            Ok(1) => Some(first[0]),
            _ => None,
        };
        let _ = self.stream.set_nonblocking(false);
        early
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), End> {
        self.stream
            .write_all(bytes)
            .map_err(|e| End::Closed(format!("send failed: {e}")))
    }

    /// Ok(true): associated; Ok(false): rejected or closed before; Err: abort.
    fn negotiate(&mut self) -> Result<bool, End> {
        let artim = Instant::now() + self.shared.cfg.acse_timeout;
        let kind = match self.read_pdu(Some(artim), false) {
            Ok(k) => k,
            Err(End::Closed(why)) => {
                if !why.is_empty() {
                    let line = format!("connection closed: {why}");
                    say(self.shared, self.addr.ip(), Level::Info, &line);
                }
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        if kind != pdu::A_ASSOCIATE_RQ {
            return Ok(false); // an A-ABORT before association: just close
        }
        let over_limit = self.shared.associations.fetch_add(1, Ordering::SeqCst)
            >= self.shared.cfg.max_associations;
        self.counted = true;
        let rq = pdu::parse_associate_rq(&self.body)
            .map_err(|e| End::Abort(6, format!("A-ASSOCIATE-RQ with {e}")))?;
        self.calling_ae = rq.calling_ae();
        self.peer_max_pdu = rq.max_pdu;
        let reject = |this: &mut Self, rj: (u8, u8, u8), why: &str| -> Result<bool, End> {
            let line = format!("association from {} rejected: {why}", this.calling_ae);
            say(this.shared, this.addr.ip(), Level::Warning, &line);
            this.send(&pdu::encode_associate_rj(rj.0, rj.1, rj.2))?;
            Ok(false)
        };
        if over_limit {
            let max = self.shared.cfg.max_associations;
            let line =
                format!("association rejected: {max} associations open (dicom.max_associations)");
            say(self.shared, self.addr.ip(), Level::Warning, &line);
            self.send(&pdu::encode_associate_rj(2, 3, 2))?;
            return Ok(false);
        }
        {
            let mut limits = lock(&self.shared.limits);
            limits.half_open -= 1;
            limits.associated += 1;
            self.half_open = false;
        }
        if rq.protocol_version & 1 == 0 {
            return reject(self, (1, 2, 2), "protocol version not supported");
        }
        if rq.application_context != pdu::APPLICATION_CONTEXT {
            return reject(self, (1, 1, 2), "application context name not supported");
        }
        let peer = Peer {
            address: self.addr.ip().to_string(),
            port: self.addr.port(),
        };
        match self.shared.handler.associate(&peer, &rq) {
            Decision::Accept => {}
            Decision::Reject(a, b, c) => {
                // the handler logged why
                self.send(&pdu::encode_associate_rj(a, b, c))?;
                return Ok(false);
            }
        }
        if let Some(kind) = self.pdu_sent_early() {
            let name = pdu::pdu_name(kind);
            return Err(End::Abort(
                2,
                format!("{name} before the association was established"),
            ));
        }
        let cfg = &self.shared.cfg;
        let outcome = negotiate(&rq, &cfg.contexts, cfg.unknown_storage.as_ref());
        let ac = pdu::encode_associate_ac(&AssociateAc {
            rq: &rq,
            contexts: &outcome.results,
            roles: &outcome.roles,
            max_pdu: cfg.max_pdu,
            implementation_class_uid: &cfg.implementation_class_uid,
            implementation_version: &cfg.implementation_version,
        });
        self.accepted = outcome.accepted;
        self.send(&ac)?;
        self.activity.started = Some(Instant::now());
        Ok(true)
    }

    fn serve(&mut self) -> End {
        loop {
            let kind = match self.read_pdu(None, true) {
                Ok(k) => k,
                Err(end) => return end,
            };
            match kind {
                pdu::P_DATA_TF => {
                    if let Err(end) = self.pdata() {
                        return end;
                    }
                }
                pdu::A_RELEASE_RQ => {
                    if self.receiving.is_some() || self.command_cx.is_some() {
                        self.abandon();
                    }
                    let _ = self.stream.write_all(&pdu::encode_release_rp());
                    return End::Released;
                }
                pdu::A_ABORT => return End::Closed("aborted by the peer".into()),
                _ => return End::Abort(2, format!("unexpected {}", pdu::pdu_name(kind))),
            }
        }
    }

    fn pdata(&mut self) -> Result<(), End> {
        let body = std::mem::take(&mut self.body);
        let result = self.pdvs(&body);
        self.body = body;
        result
    }

    fn pdvs(&mut self, body: &[u8]) -> Result<(), End> {
        let pdvs = pdu::split_pdvs(body)
            .map_err(|e| End::Abort(6, format!("malformed P-DATA-TF: {e}")))?;
        for pdv in pdvs {
            if let Some(col) = self.collecting.as_mut() {
                if pdv.is_command() || pdv.context_id != col.context_id {
                    return Err(End::Abort(
                        2,
                        format!(
                            "PDV (context {}, header 0x{:02X}) out of place during a data set",
                            pdv.context_id, pdv.control
                        ),
                    ));
                }
                if col.data.len() + pdv.data.len() > MAX_REQUEST_DATA {
                    return Err(End::Abort(
                        6,
                        format!("request data set longer than {MAX_REQUEST_DATA} bytes"),
                    ));
                }
                col.data.extend_from_slice(pdv.data);
                if pdv.is_last() {
                    if let Some(col) = self.collecting.take() {
                        self.request(col)?;
                    }
                }
                continue;
            }
            if let Some(rx) = self.receiving.as_mut() {
                if pdv.is_command() || pdv.context_id != rx.context_id {
                    return Err(End::Abort(
                        2,
                        format!(
                            "PDV (context {}, header 0x{:02X}) out of place during a data set",
                            pdv.context_id, pdv.control
                        ),
                    ));
                }
                if rx.failure.is_none() {
                    if let Some((file, _)) = rx.spool.as_mut() {
                        match file.write_all(pdv.data) {
                            Ok(()) => {
                                rx.sha.update(pdv.data);
                                rx.size += pdv.data.len() as u64;
                            }
                            Err(e) => rx.failure = Some(e),
                        }
                    }
                }
                if pdv.is_last() {
                    self.complete_store()?;
                }
                continue;
            }
            if !pdv.is_command() {
                return Err(End::Abort(2, "data set PDV without a command".into()));
            }
            if self.command_cx.is_some_and(|cx| cx != pdv.context_id) {
                return Err(End::Abort(
                    2,
                    "command fragments on two presentation contexts".into(),
                ));
            }
            if self.command.len() + pdv.data.len() > MAX_COMMAND {
                return Err(End::Abort(6, "command set too long".into()));
            }
            self.command_cx = Some(pdv.context_id);
            extend_bounded(&mut self.command, pdv.data);
            if pdv.is_last() {
                let raw = std::mem::take(&mut self.command);
                let cx = self.command_cx.take().unwrap_or(pdv.context_id);
                self.command(cx, &raw)?;
            }
        }
        Ok(())
    }

    fn command(&mut self, cx_id: u8, raw: &[u8]) -> Result<(), End> {
        let cmd = dimse::parse_command(raw).map_err(|e| End::Abort(6, e.to_string()))?;
        let Some(cx) = self.accepted.get(&cx_id).cloned() else {
            return Err(End::Abort(
                6,
                format!("command on presentation context {cx_id}, which is not accepted"),
            ));
        };
        match cmd.command_field {
            dimse::C_ECHO_RQ if cx.abstract_syntax == VERIFICATION && !cmd.has_data_set() => {
                self.used("c-echo");
                let rsp = dimse::encode_echo_rsp(cmd.message_id, &cx.abstract_syntax);
                let out = pdu::encode_pdata(cx_id, true, &rsp, self.peer_max_pdu);
                self.send(&out)
            }
            dimse::C_STORE_RQ if !cmd.missing_for_store().is_empty() => {
                let missing = cmd.missing_for_store().join(", ");
                Err(End::Abort(0, format!("a C-STORE-RQ without {missing}")))
            }
            dimse::C_STORE_RQ if cx.storage && cx.as_scp && cmd.has_data_set() => {
                self.begin_store(cx_id, &cx, cmd)
            }
            dimse::C_FIND_RQ | dimse::C_GET_RQ | dimse::C_MOVE_RQ
                if cx.as_scp && cmd.has_data_set() && serves(cmd.command_field, &cx.abstract_syntax) =>
            {
                self.collecting = Some(Collecting { context_id: cx_id, command: cmd, data: Vec::new() });
                Ok(())
            }
            dimse::N_ACTION_RQ if cx.as_scp && cx.abstract_syntax == COMMITMENT => {
                let col = Collecting { context_id: cx_id, command: cmd, data: Vec::new() };
                if col.command.has_data_set() {
                    self.collecting = Some(col);
                    Ok(())
                } else {
                    self.request(col)
                }
            }
            // a C-CANCEL of no operation in progress (it ended meanwhile) is ignored, as pynetdicom does
            dimse::C_CANCEL_RQ => Ok(()),
            field => Err(End::Abort(2, format!(
                "DIMSE command 0x{field:04X} on context {cx_id} ({}) is not supported by the native receiver",
                cx.abstract_syntax))),
        }
    }

    fn request(&mut self, col: Collecting) -> Result<(), End> {
        let Some(cx) = self.accepted.get(&col.context_id).cloned() else {
            return Ok(());
        };
        let address = self.addr.ip().to_string();
        let calling = self.calling_ae.clone();
        let req = Request {
            calling_ae: &calling,
            address: &address,
            port: self.addr.port(),
            command: &col.command,
            abstract_syntax: &cx.abstract_syntax,
            transfer_syntax: &cx.transfer_syntax,
            data: &col.data,
        };
        match col.command.command_field {
            dimse::C_FIND_RQ => {
                self.used("c-find");
                let mut answers = self.shared.handler.find(&req);
                let result = self.find(col.context_id, &col.command, &cx, answers.as_mut());
                answers.close();
                result
            }
            dimse::C_GET_RQ | dimse::C_MOVE_RQ => {
                let get = col.command.command_field == dimse::C_GET_RQ;
                self.used(if get { "c-get" } else { "c-move" });
                match self.shared.handler.retrieve(&req) {
                    RetrievePlan::Answer(status, counts, identifier) => {
                        self.activity.failures += u32::from(failed_status(status));
                        self.retrieve_rsp(
                            col.context_id,
                            &col.command,
                            &cx,
                            status,
                            counts,
                            identifier.as_deref(),
                        )
                    }
                    RetrievePlan::Run(mut job) => {
                        let result = self.retrieve(col.context_id, &col.command, &cx, job.as_mut());
                        job.close();
                        result
                    }
                }
            }
            _ => {
                self.used("n-action");
                let (status, reply) = self.shared.handler.action(&req);
                self.activity.failures += u32::from(failed_status(status));
                let cmd = &col.command;
                let rsp = dimse::encode_action_rsp(
                    cmd.message_id,
                    &cmd.requested_sop_class,
                    &cmd.requested_sop_instance,
                    cmd.action_type_id,
                    status,
                    reply.is_some(),
                );
                self.send_message(col.context_id, &rsp, reply.as_deref())
            }
        }
    }

    /// A command set and its data set (if any) as P-DATA-TF PDUs within the peer's maximum.
    fn send_message(&mut self, cx_id: u8, command: &[u8], data: Option<&[u8]>) -> Result<(), End> {
        let mut out = pdu::encode_pdata(cx_id, true, command, self.peer_max_pdu);
        if let Some(data) = data {
            out.extend_from_slice(&pdu::encode_pdata(cx_id, false, data, self.peer_max_pdu));
        }
        self.send(&out)
    }

    fn find(
        &mut self,
        cx_id: u8,
        cmd: &Command,
        cx: &Accepted,
        answers: &mut dyn FindAnswers,
    ) -> Result<(), End> {
        let sop_class = cx.abstract_syntax.as_str();
        loop {
            if let Incoming::Cancel = self.incoming(cmd.message_id, false)? {
                let rsp = dimse::encode_find_rsp(cmd.message_id, sop_class, CANCEL, false);
                return self.send_message(cx_id, &rsp, None);
            }
            match answers.next() {
                Some(FindAnswer::Pending(identifier)) => {
                    let rsp = dimse::encode_find_rsp(cmd.message_id, sop_class, PENDING, true);
                    self.send_message(cx_id, &rsp, Some(&identifier))?;
                }
                Some(FindAnswer::Final(status)) => {
                    self.activity.failures += u32::from(failed_status(status));
                    let rsp = dimse::encode_find_rsp(cmd.message_id, sop_class, status, false);
                    return self.send_message(cx_id, &rsp, None);
                }
                None => {
                    let rsp = dimse::encode_find_rsp(cmd.message_id, sop_class, 0, false);
                    return self.send_message(cx_id, &rsp, None);
                }
            }
        }
    }

    fn retrieve_rsp(
        &mut self,
        cx_id: u8,
        cmd: &Command,
        cx: &Accepted,
        status: u16,
        counts: Option<dimse::Counts>,
        identifier: Option<&[u8]>,
    ) -> Result<(), End> {
        let field = if cmd.command_field == dimse::C_GET_RQ {
            dimse::C_GET_RSP
        } else {
            dimse::C_MOVE_RSP
        };
        let rsp = dimse::encode_retrieve_rsp(
            field,
            cmd.message_id,
            &cx.abstract_syntax,
            status,
            counts,
            identifier.is_some(),
        );
        self.send_message(cx_id, &rsp, identifier)
    }

    fn retrieve(
        &mut self,
        cx_id: u8,
        cmd: &Command,
        cx: &Accepted,
        job: &mut dyn Retrieval,
    ) -> Result<(), End> {
        let is_get = cmd.command_field == dimse::C_GET_RQ;
        let total = job.count();
        if total == 0 {
            return self.retrieve_rsp(cx_id, cmd, cx, 0, Some(dimse::Counts::default()), None);
        }
        if total > 65535 {
            let status = if is_get { 0xC416 } else { 0xC516 };
            return self.retrieve_rsp(cx_id, cmd, cx, status, None, None);
        }
        let mut dest = None;
        if !is_get {
            match self.connect(job.destination()) {
                Some(assoc) => dest = Some(assoc),
                None => return self.retrieve_rsp(cx_id, cmd, cx, 0xA801, None, None),
            }
        }
        let result = self.suboperations(cx_id, cmd, cx, job, total, dest.as_mut());
        if let Some(mut assoc) = dest {
            if assoc.is_open() {
                let _ = assoc.release();
            }
        }
        result
    }

    /// The association of a C-MOVE with its destination; None (logged) when there is none.
    fn connect(&self, dest: Option<Destination>) -> Option<scu::Association> {
        let Some(dest) = dest else {
            self.log(Level::Error, "C-MOVE without a destination");
            return None;
        };
        let cfg = &self.shared.cfg;
        let scu_cfg = scu::ScuConfig {
            calling_ae: dest.calling_ae.clone(),
            called_ae: dest.called_ae.clone(),
            max_pdu: cfg.max_pdu,
            implementation_class_uid: cfg.implementation_class_uid.clone(),
            implementation_version: cfg.implementation_version.clone(),
            connect_timeout: cfg.acse_timeout,
            acse_timeout: cfg.acse_timeout,
            network_timeout: cfg.network_timeout,
            dimse_timeout: cfg.dimse_timeout,
            whole_read_limit: send::WHOLE_READ_LIMIT,
        };
        let contexts: Vec<scu::ContextProposal> = dest
            .contexts
            .iter()
            .map(|(abstract_syntax, syntaxes)| scu::ContextProposal {
                abstract_syntax: abstract_syntax.clone(),
                transfer_syntaxes: syntaxes.clone(),
            })
            .collect();
        let tls = match dest.tls.as_ref().map(scu::TlsClient::shared).transpose() {
            Ok(tls) => tls,
            Err(e) => {
                self.log(
                    Level::Error,
                    &format!(
                        "C-MOVE destination {} ({}:{}): TLS settings: {e}",
                        dest.called_ae, dest.host, dest.port
                    ),
                );
                return None;
            }
        };
        let assoc = scu::Association::request_over(
            &dest.host,
            dest.port,
            tls.as_ref(),
            scu_cfg,
            &contexts,
            &[],
        );
        match assoc {
            Ok(assoc) => Some(assoc),
            Err(e) => {
                self.log(
                    Level::Warning,
                    &format!(
                        "C-MOVE destination {} ({}:{}): {e}",
                        dest.called_ae, dest.host, dest.port
                    ),
                );
                None
            }
        }
    }

    /// The C-STORE sub-operations of a C-GET (on this association) or a C-MOVE (on `dest`), their
    /// Pending responses and the final one, as pynetdicom counts and answers them.
    fn suboperations(
        &mut self,
        cx_id: u8,
        cmd: &Command,
        cx: &Accepted,
        job: &mut dyn Retrieval,
        total: usize,
        mut dest: Option<&mut scu::Association>,
    ) -> Result<(), End> {
        self.cancelled = false;
        let mut counts = dimse::Counts {
            remaining: Some(total as u16),
            ..dimse::Counts::default()
        };
        let mut failed: Vec<String> = Vec::new();
        let mut n = 0u32;
        let requester = self.calling_ae.clone();
        let mut batch = std::collections::VecDeque::new();
        while counts.remaining != Some(0) {
            if batch.is_empty() {
                batch.extend(job.next_batch(RETRIEVE_BATCH));
            }
            let Some(sub) = batch.pop_front() else {
                // the job ended before every announced instance was handed out (its index read failed):
                // those sub-operations failed, never a Success for what was not sent
                let left = counts.remaining.unwrap_or(0);
                for _ in 0..left {
                    job.sent(false, 0, None);
                }
                counts.failed = counts.failed.saturating_add(left);
                self.activity.failures += u32::from(left);
                counts.remaining = Some(0);
                break;
            };
            let position = n as usize;
            if self.cancelled || matches!(self.incoming(cmd.message_id, false)?, Incoming::Cancel) {
                let identifier = job.failed_identifier(&failed);
                return self.retrieve_rsp(cx_id, cmd, cx, CANCEL, Some(counts), Some(&identifier));
            }
            n += 1;
            let originator = dest.as_ref().map(|_| (requester.as_str(), cmd.message_id));
            let (status, size) = self.suboperation(
                dest.as_deref_mut(),
                &sub,
                position,
                cmd.message_id,
                originator,
                job,
            )?;
            let warning = matches!(status, Some(0x0001 | 0xB000 | 0xB006 | 0xB007));
            let ok = status == Some(0) || warning;
            job.sent(ok, if ok { size } else { 0 }, status);
            if status == Some(0) {
                counts.completed += 1;
            } else if warning {
                counts.warning += 1;
            } else {
                counts.failed += 1;
                failed.push(sub.sop_instance_uid);
            }
            if ok {
                self.activity.sent += 1;
            } else {
                self.activity.failures += 1;
            }
            counts.remaining = counts.remaining.map(|r| r.saturating_sub(1));
            self.retrieve_rsp(cx_id, cmd, cx, PENDING, Some(counts), None)?;
        }
        let status = if counts.failed == 0 && counts.warning == 0 {
            0
        } else if usize::from(counts.failed) == total {
            SUBOPS_FAILED
        } else {
            SUBOPS_WARNING
        };
        let identifier = (status != 0).then(|| job.failed_identifier(&failed));
        self.retrieve_rsp(cx_id, cmd, cx, status, Some(counts), identifier.as_deref())
    }

    /// The transfer syntax to send `sop_class` stored in `ts` in: the stored one when a context
    /// accepted it, else another little-endian uncompressed one (re-encoded), else None.
    fn syntax_for(
        &self,
        dest: Option<&scu::Association>,
        sop_class: &str,
        ts: &str,
    ) -> Option<String> {
        let accepted: Vec<String> = match dest {
            Some(a) => a
                .accepted()
                .iter()
                .filter(|c| c.abstract_syntax == sop_class)
                .map(|c| c.transfer_syntax.clone())
                .collect(),
            None => {
                let mut ids: Vec<&u8> = self.accepted.keys().collect();
                ids.sort();
                ids.into_iter()
                    .map(|id| &self.accepted[id])
                    .filter(|c| c.as_scu && c.abstract_syntax == sop_class)
                    .map(|c| c.transfer_syntax.clone())
                    .collect()
            }
        };
        if accepted.iter().any(|t| t == ts) {
            return Some(ts.to_string());
        }
        if !LITTLE_ENDIAN.contains(&ts) {
            return None;
        }
        accepted
            .into_iter()
            .find(|t| LITTLE_ENDIAN.contains(&t.as_str()))
    }

    /// Our context for C-STORE-RQs of `sop_class` in `ts` on this association (lowest ID first).
    fn store_context(&self, sop_class: &str, ts: &str) -> Option<u8> {
        let mut ids: Vec<&u8> = self.accepted.keys().collect();
        ids.sort();
        ids.into_iter()
            .find(|id| {
                let cx = &self.accepted[*id];
                cx.as_scu && cx.abstract_syntax == sop_class && cx.transfer_syntax == ts
            })
            .copied()
    }

    /// One C-STORE sub-operation: (the peer's status, or None when nothing could be sent; the
    /// data set's size). Candidate copies are tried in order, each failing one reported to
    /// `job`, then the job's fallback copy. A broken association with the requester ends the
    /// operation; a broken one with a C-MOVE destination fails the sub-operation. `position`: the
    /// instance's rank in the job's order (see [`Retrieval`]).
    fn suboperation(
        &mut self,
        mut dest: Option<&mut scu::Association>,
        sub: &SubOperation,
        position: usize,
        operation_id: u16,
        originator: Option<(&str, u16)>,
        job: &mut dyn Retrieval,
    ) -> Result<(Option<u16>, u64), End> {
        // as pynetdicom numbers them: the request's ID plus the sub-operation's rank (from 1), wrapped
        let mut id = u32::from(operation_id) + position as u32 + 1;
        if id > 65535 {
            id -= 65535;
        }
        let message_id = id as u16;
        let uid = &sub.sop_instance_uid;
        let Some(ts) = self.syntax_for(
            dest.as_deref(),
            &sub.sop_class_uid,
            &sub.transfer_syntax_uid,
        ) else {
            self.log(
                Level::Error,
                &format!(
                    "sub-operation of {uid}: no accepted presentation context for {} in {}",
                    sub.sop_class_uid, sub.transfer_syntax_uid
                ),
            );
            return Ok((None, 0));
        };
        let mut candidates: Vec<(Option<usize>, CopyRef)> = if ts == sub.transfer_syntax_uid {
            sub.copies
                .iter()
                .cloned()
                .enumerate()
                .map(|(i, c)| (Some(i), c))
                .collect()
        } else {
            // re-encoded by the embedding program from a copy it verified
            match job.convert(position, &ts) {
                Some(copy) => vec![(None, copy)],
                None => return Ok((None, 0)),
            }
        };
        candidates.reverse();
        let mut fallback_tried = ts != sub.transfer_syntax_uid;
        let mut converted = fallback_tried;
        loop {
            let (index, copy) = match candidates.pop() {
                Some(c) => c,
                None if !fallback_tried => {
                    fallback_tried = true;
                    match job.fallback(position) {
                        Some(copy) => (None, copy),
                        None => return Ok((None, 0)),
                    }
                }
                None => return Ok((None, 0)),
            };
            let result = match dest.as_deref_mut() {
                Some(assoc) => assoc.send_store(
                    &scu::Instance {
                        sop_class_uid: &sub.sop_class_uid,
                        sop_instance_uid: uid,
                        transfer_syntax: &ts,
                        path: &copy.path,
                        sha256: &copy.sha256,
                    },
                    originator,
                ),
                None => {
                    let Some(context_id) = self.store_context(&sub.sop_class_uid, &ts) else {
                        return Ok((None, 0));
                    };
                    let cfg = &self.shared.cfg;
                    let settings = send::SendSettings {
                        network_timeout: cfg.network_timeout,
                        response_timeout: cfg.dimse_timeout,
                        ..send::SendSettings::new(self.peer_max_pdu, cfg.max_pdu)
                    };
                    let sender = self
                        .sender
                        .get_or_insert_with(|| send::Sender::new(settings));
                    let req = send::StoreRequest {
                        context_id,
                        transfer_syntax: &ts,
                        message_id,
                        sop_class_uid: &sub.sop_class_uid,
                        sop_instance_uid: uid,
                        priority: 2,
                        move_originator: originator,
                    };
                    sender.send_store(&mut self.stream, &req, &copy.path, &copy.sha256)
                }
            };
            match result {
                Ok(outcome) => {
                    if outcome.cancel == Some(operation_id) {
                        self.cancelled = true;
                    }
                    return Ok((Some(outcome.response.status), outcome.data_set_bytes));
                }
                Err(send::SendError::Link(e)) => {
                    let why = format!("sub-operation of {uid}: {e}");
                    if dest.is_some() {
                        self.log(Level::Warning, &why);
                        return Ok((None, 0));
                    }
                    return Err(match e {
                        send::LinkError::PeerAborted { .. } | send::LinkError::Closed(_) => {
                            End::Closed(why)
                        }
                        _ => End::Abort(0, why),
                    });
                }
                Err(send::SendError::Unusable(why)) if !converted && copy.path.exists() => {
                    // a stored copy this sender declines as it is (e.g. an odd-length deflated data
                    // set): not a damaged copy. The embedding program re-encodes one it verified.
                    converted = true;
                    self.log(
                        Level::Warning,
                        &format!("sub-operation of {uid}: {why}; sending a re-encoded copy"),
                    );
                    if let Some(copy) = job.convert(position, &ts) {
                        candidates.push((None, copy));
                    }
                }
                Err(e) => {
                    let (why, fault) = match &e {
                        send::SendError::DigestMismatch { .. } => (
                            format!("{} content digest mismatch", copy.path.display()),
                            CopyFault::Corrupt,
                        ),
                        _ if !copy.path.exists() => (
                            format!("{} not found", copy.path.display()),
                            CopyFault::Missing,
                        ),
                        _ => (e.to_string(), CopyFault::Unreadable),
                    };
                    match index {
                        Some(i) => job.bad_copy(position, i, &why, fault),
                        None => self.log(Level::Error, &format!("sub-operation of {uid}: {why}")),
                    }
                }
            }
        }
    }

    /// True when the socket has bytes to read now.
    fn readable(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the association's open socket.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }

    /// Read what the peer sent during an operation: a C-CANCEL-RQ of `message_id`.
    /// `wait`: block (up to the network timeout) for a PDU; else read only what is already there.
    /// A release request ends the association (after the reply), an abort ends it; another request
    /// aborts (asynchronous operations are not negotiated).
    fn incoming(&mut self, message_id: u16, wait: bool) -> Result<Incoming, End> {
        loop {
            if !wait && self.command.is_empty() && !self.readable() {
                return Ok(Incoming::Nothing);
            }
            let kind = self.read_pdu(None, true)?;
            match kind {
                pdu::P_DATA_TF => {}
                pdu::A_RELEASE_RQ => {
                    self.log(
                        Level::Info,
                        &format!(
                            "association from {} released during an operation",
                            self.calling_ae
                        ),
                    );
                    let _ = self.stream.write_all(&pdu::encode_release_rp());
                    return Err(End::Released);
                }
                pdu::A_ABORT => return Err(End::Closed("aborted by the peer".into())),
                _ => return Err(End::Abort(2, format!("unexpected {}", pdu::pdu_name(kind)))),
            }
            let body = std::mem::take(&mut self.body);
            let found = self.incoming_pdvs(&body, message_id);
            self.body = body;
            match found? {
                Incoming::Nothing => continue,
                other => return Ok(other),
            }
        }
    }

    fn incoming_pdvs(&mut self, body: &[u8], message_id: u16) -> Result<Incoming, End> {
        let pdvs = pdu::split_pdvs(body)
            .map_err(|e| End::Abort(6, format!("malformed P-DATA-TF: {e}")))?;
        let mut found = Incoming::Nothing;
        for pdv in pdvs {
            if !pdv.is_command() || self.command_cx.is_some_and(|cx| cx != pdv.context_id) {
                return Err(End::Abort(
                    2,
                    "a data set or a split command during an operation".into(),
                ));
            }
            if self.command.len() + pdv.data.len() > MAX_COMMAND {
                return Err(End::Abort(6, "command set too long".into()));
            }
            self.command_cx = Some(pdv.context_id);
            extend_bounded(&mut self.command, pdv.data);
            if !pdv.is_last() {
                continue;
            }
            let raw = std::mem::take(&mut self.command);
            self.command_cx = None;
            let cmd = dimse::parse_command(&raw).map_err(|e| End::Abort(6, e.to_string()))?;
            match cmd.command_field {
                dimse::C_CANCEL_RQ if cmd.responded_to == Some(message_id) => {
                    found = Incoming::Cancel;
                }
                dimse::C_CANCEL_RQ => {}
                field => {
                    return Err(End::Abort(
                        2,
                        format!(
                            "DIMSE command 0x{field:04X} during another operation \
                             (asynchronous operations are not negotiated)"
                        ),
                    ))
                }
            }
        }
        Ok(found)
    }

    fn spool_file(&mut self) -> io::Result<(File, PathBuf)> {
        loop {
            self.spool_seq += 1;
            let path = self.shared.cfg.spool_dir.join(format!(
                "nv{}-{}-{}.dcm",
                std::process::id(),
                self.id,
                self.spool_seq
            ));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(f) => return Ok((f, path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn begin_store(&mut self, cx_id: u8, cx: &Accepted, cmd: Command) -> Result<(), End> {
        let started_ns = now_ns();
        let cfg = &self.shared.cfg;
        let header = dimse::spool_header(
            &cmd.affected_sop_class,
            &cmd.affected_sop_instance,
            &cx.transfer_syntax,
            &cfg.spool_implementation_uid,
            &cfg.spool_implementation_version,
        );
        let mut failure = None;
        let mut spool = None;
        // the UIDs are judged by the handler (as the Python receiver's ingest does), not here; a spool
        // that cannot be made or written: the data set is read and dropped, then answered
        match self.spool_file() {
            Ok((mut file, path)) => {
                if let Err(e) = file.write_all(&header) {
                    failure = Some(e);
                }
                spool = Some((file, path));
            }
            Err(e) => failure = Some(e),
        }
        let mut sha = Sha256::new();
        sha.update(&header);
        self.receiving = Some(Receiving {
            context_id: cx_id,
            command: cmd,
            transfer_syntax: cx.transfer_syntax.clone(),
            spool,
            sha,
            size: header.len() as u64,
            started_ns,
            failure,
        });
        Ok(())
    }

    fn complete_store(&mut self) -> Result<(), End> {
        let Some(rx) = self.receiving.take() else {
            return Ok(());
        };
        let ended_ns = now_ns();
        let Receiving {
            context_id,
            command,
            transfer_syntax,
            spool,
            sha,
            size,
            started_ns,
            mut failure,
        } = rx;
        let path = spool.map(|(file, path)| {
            drop(file);
            path
        });
        let answer = match (failure.take(), path.clone()) {
            (Some(e), _) => {
                self.log(
                    Level::Error,
                    &format!(
                        "C-STORE of {}: spooling failed: {e}",
                        command.affected_sop_instance
                    ),
                );
                StoreAnswer {
                    status: 0xA700,
                    comment: Some("spooling the data set failed".into()),
                }
            }
            (None, None) => StoreAnswer {
                status: 0xA700,
                comment: Some("spooling the data set failed".into()),
            },
            (None, Some(path)) => {
                let record = StoreRecord {
                    path,
                    sha256: hex(&sha.finalize()),
                    size,
                    calling_ae: self.calling_ae.clone(),
                    address: self.addr.ip().to_string(),
                    message_id: command.message_id,
                    sop_class_uid: command.affected_sop_class.clone(),
                    sop_instance_uid: command.affected_sop_instance.clone(),
                    transfer_syntax_uid: transfer_syntax,
                    move_originator: command.move_originator_ae.clone(),
                    started_ns,
                    ended_ns,
                };
                *lock(&self.shared.inflight) += 1;
                let answer = self.shared.handler.store(&record);
                let mut n = lock(&self.shared.inflight);
                *n -= 1;
                self.shared.idle.notify_all();
                answer
            }
        };
        if let Some(path) = &path {
            let _ = std::fs::remove_file(path);
        }
        self.used("c-store");
        if failed_status(answer.status) {
            self.activity.failures += 1;
        } else {
            self.activity.stored += 1;
        }
        let comment = answer.comment.as_deref().map(clean_comment);
        let rsp = dimse::encode_store_rsp(
            command.message_id,
            &command.affected_sop_class,
            &command.affected_sop_instance,
            answer.status,
            comment.as_deref(),
        );
        let out = pdu::encode_pdata(context_id, true, &rsp, self.peer_max_pdu);
        self.send(&out)
    }

    /// Forget a C-STORE being received and remove its spool file.
    fn abandon(&mut self) {
        self.command.clear();
        self.command_cx = None;
        self.collecting = None;
        if let Some(rx) = self.receiving.take() {
            if let Some((file, path)) = rx.spool {
                drop(file);
                let _ = std::fs::remove_file(&path);
            }
            self.log(
                Level::Info,
                &format!(
                    "C-STORE of {} not completed; spool removed",
                    rx.command.affected_sop_instance
                ),
            );
        }
    }
}

const LITTLE_ENDIAN: [&str; 2] = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"];

/// True when `command_field` is the DIMSE service of the Q/R information model `abstract_syntax`.
fn serves(command_field: u16, abstract_syntax: &str) -> bool {
    let models: &[&str] = match command_field {
        dimse::C_FIND_RQ => &FIND_MODELS,
        dimse::C_GET_RQ => &GET_MODELS,
        dimse::C_MOVE_RQ => &MOVE_MODELS,
        _ => &[],
    };
    models.contains(&abstract_syntax)
}

/// An Error Comment (LO): ASCII, no backslash, at most 64 characters.
/// Append ``data`` (already checked to fit under ``MAX_COMMAND``) without growing the buffer past it.
fn extend_bounded(buf: &mut Vec<u8>, data: &[u8]) {
    let need = buf.len() + data.len();
    if need > buf.capacity() {
        let want = (buf.capacity() * 2).clamp(need, MAX_COMMAND.max(need));
        buf.reserve_exact(want - buf.len());
    }
    buf.extend_from_slice(data);
}

fn clean_comment(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| {
            if c.is_ascii() && c != '\\' && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .take(64)
        .collect();
    cleaned.trim().to_string()
}
