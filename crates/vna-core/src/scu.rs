//! An association requestor (TCP, or TLS as PS3.15 B.1 and BCP 195 say): connect,
//! A-ASSOCIATE-RQ/AC, C-STORE-RQs sent with [`crate::send`], A-RELEASE and A-ABORT. It carries
//! the C-MOVE sub-operations to their destination.
//!
//! TLS ([`TlsClient`], rustls with the ring provider): TLS 1.2 or 1.3; the peer's certificate
//! must chain to the configured CA bundle (else the system's CAs) and name the host we connect
//! to (a DNS name or an IP address), as Python's `ssl.create_default_context` checks it; our
//! certificate is presented when configured and the peer asks. The handshake completes before
//! the A-ASSOCIATE-RQ goes out: an untrusted peer receives no DICOM byte.
//!
//! Bounds: the connection must be made within `connect_timeout`; the TLS handshake, the
//! A-ASSOCIATE-AC/RJ and the A-RELEASE-RP must arrive within `acse_timeout` (ARTIM); each read
//! or write waits at most `network_timeout`; a C-STORE-RSP at most `dimse_timeout`. An A-ASSOCIATE-AC is read
//! up to [`crate::server::MAX_ASSOCIATE_RQ`] bytes, a P-DATA-TF up to our announced maximum
//! (or [`crate::server::MAX_UNLIMITED_PDATA`] when we announce none), whatever the peer says.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore,
    SignatureScheme, StreamOwned,
};

use crate::dimse;
use crate::pdu::{self, AssociateRq, ProposedContext, RoleSelection};
use crate::send::{
    self, LinkError, SendError, SendSettings, Sender, StoreOutcome, StoreRequest, Transport,
};

/// Settings of a requested association.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScuConfig {
    pub calling_ae: String,
    pub called_ae: String,
    /// Our Maximum Length Received (0: unlimited).
    pub max_pdu: u32,
    pub implementation_class_uid: String,
    pub implementation_version: String,
    pub connect_timeout: Duration,
    /// ARTIM: the longest the A-ASSOCIATE-AC/RJ and the A-RELEASE-RP may take.
    pub acse_timeout: Duration,
    /// The longest a single read or write may wait.
    pub network_timeout: Duration,
    /// The longest a C-STORE-RSP may take after its data set went out.
    pub dimse_timeout: Duration,
    /// Files up to this size are read whole and hashed once (see [`crate::send`]).
    pub whole_read_limit: u64,
}

/// An abstract syntax proposed with its transfer syntaxes (in our order of preference).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextProposal {
    pub abstract_syntax: String,
    pub transfer_syntaxes: Vec<String>,
}

/// A presentation context the acceptor accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// Why no association was established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssociateError {
    /// The settings or proposal are malformed (nothing was sent).
    Invalid(String),
    /// No connection could be made (TCP, or the TLS handshake: nothing was sent).
    Connect(String),
    /// The acceptor sent an A-ASSOCIATE-RJ: result (1 permanent, 2 transient), source, reason
    /// (PS3.8 9.3.4).
    Rejected { result: u8, source: u8, reason: u8 },
    /// The negotiation failed (timeout, A-ABORT, malformed answer, nothing accepted).
    Failed(LinkError),
}

impl fmt::Display for AssociateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AssociateError::Invalid(why) => write!(f, "invalid association request: {why}"),
            AssociateError::Connect(why) => write!(f, "cannot connect: {why}"),
            AssociateError::Rejected {
                result,
                source,
                reason,
            } => write!(
                f,
                "association rejected ({}, source {source}, reason {reason})",
                if *result == 2 {
                    "transient"
                } else {
                    "permanent"
                }
            ),
            AssociateError::Failed(e) => write!(f, "association failed: {e}"),
        }
    }
}

impl std::error::Error for AssociateError {}

impl From<LinkError> for AssociateError {
    fn from(e: LinkError) -> Self {
        AssociateError::Failed(e)
    }
}

/// How associations with a TLS peer are secured.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsSettings {
    /// PEM CA bundle the peer's certificate must chain to (None: the system's CAs). A
    /// self-signed certificate in it may be the peer's own, as OpenSSL accepts it.
    pub ca_file: Option<PathBuf>,
    /// Our PEM certificate (chain) and its private key, presented when the peer asks.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A TLS client configuration built from [`TlsSettings`] (cheap to clone).
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient").finish_non_exhaustive()
    }
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

impl TlsClient {
    /// Load the CA bundle (or the system's CAs) and our certificate and key; an error names
    /// the file that could not be used.
    pub fn new(settings: &TlsSettings) -> Result<TlsClient, String> {
        // ring: no C toolchain beyond cc (aws-lc-rs needs cmake); its key exchange groups are the
        // classical ones (X25519, P-256, P-384), which BCP 195 asks for.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        match &settings.ca_file {
            Some(path) => {
                for cert in read_certs(path, "CA bundle")? {
                    roots
                        .add(cert.clone())
                        .map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
                    anchors.push(cert);
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| format!("CA certificates: {e}"))?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerVerifier { webpki, anchors }));
        let config = match &settings.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certs(cert, "certificate")?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("private key {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("certificate {} and its key: {e}", cert.display()))?
            }
        };
        Ok(TlsClient {
            config: Arc::new(config),
        })
    }

    /// [`TlsClient::new`] once per distinct `settings` for the life of the process (the files
    /// are read at the first use, as the Python receiver builds its context once); a failure
    /// is not remembered.
    pub fn shared(settings: &TlsSettings) -> Result<TlsClient, String> {
        static BUILT: OnceLock<Mutex<HashMap<TlsSettings, TlsClient>>> = OnceLock::new();
        let built = BUILT.get_or_init(Default::default);
        if let Some(client) = built
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(settings)
        {
            return Ok(client.clone());
        }
        let client = TlsClient::new(settings)?;
        built
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(settings.clone(), client.clone());
        Ok(client)
    }
}

/// webpki's verification, and one case OpenSSL accepts and webpki refuses: the peer presents a
/// CA certificate that is itself in the configured bundle (a self-signed certificate trusted
/// as it is). Its name is still checked; webpki checked its validity period before it found
/// the CA flag.
#[derive(Debug)]
struct PeerVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    anchors: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verdict {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(ref other)))
                if other.0.downcast_ref::<webpki::Error>()
                    == Some(&webpki::Error::CaUsedAsEndEntity) =>
            {
                if !self
                    .anchors
                    .iter()
                    .any(|a| a.as_ref() == end_entity.as_ref())
                {
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                        rustls::OtherError(Arc::new(UntrustedCa)),
                    )));
                }
                let parsed = ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            verdict => verdict,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The peer presented a CA certificate as its own and the CA bundle does not hold it.
#[derive(Debug)]
struct UntrustedCa;

impl fmt::Display for UntrustedCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the peer's certificate is a CA certificate that is not in the CA bundle")
    }
}

impl std::error::Error for UntrustedCa {}

/// `e` for a log line: an invalid certificate's own explanation rather than its debug form.
fn handshake_error(e: &io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) => {
            format!("invalid peer certificate: {other}")
        }
        _ => e.to_string(),
    }
}

/// The connection an association runs on.
enum Link {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Link {
    fn tcp(&self) -> &TcpStream {
        match self {
            Link::Plain(s) => s,
            Link::Tls(s) => &s.sock,
        }
    }

    /// Close the connection (after a TLS close_notify, bounded by the write timeout).
    fn shutdown(&mut self) {
        if let Link::Tls(s) = self {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        let _ = self.tcp().shutdown(std::net::Shutdown::Both);
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    /// A TLS write returns once its records were handed to the socket (or failed), as a TCP
    /// write does: the write timeout bounds it.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Tls(s) => {
                let n = s.write(buf)?;
                s.flush()?;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Tls(s) => s.flush(),
        }
    }
}

impl Transport for Link {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(timeout)
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp().set_write_timeout(timeout)
    }
}

/// The TLS handshake with `host` on `tcp`, completed within `acse_timeout` (each read or write
/// within `network_timeout`).
fn handshake(
    tcp: TcpStream,
    host: &str,
    tls: &TlsClient,
    acse_timeout: Duration,
    network_timeout: Duration,
) -> Result<Link, AssociateError> {
    let peer = tcp
        .peer_addr()
        .map_or_else(|_| host.to_string(), |a| a.to_string());
    let failed = |why: String| AssociateError::Connect(format!("TLS handshake with {peer}: {why}"));
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| failed(format!("{host:?} is not a host name or address: {e}")))?;
    let conn =
        ClientConnection::new(tls.config.clone(), name).map_err(|e| failed(e.to_string()))?;
    let mut stream = StreamOwned::new(conn, tcp);
    let deadline = Instant::now() + acse_timeout;
    while stream.conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(failed("not completed in time".into()));
        }
        let wait = Some(left.min(network_timeout));
        let timeouts = stream
            .sock
            .set_read_timeout(wait)
            .and_then(|()| stream.sock.set_write_timeout(wait));
        if let Err(e) = timeouts.and_then(|()| stream.conn.complete_io(&mut stream.sock).map(drop))
        {
            let _ = stream.sock.shutdown(std::net::Shutdown::Both);
            return Err(failed(handshake_error(&e)));
        }
    }
    Ok(Link::Tls(Box::new(stream)))
}

/// One stored instance to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance<'a> {
    pub sop_class_uid: &'a str,
    pub sop_instance_uid: &'a str,
    /// The transfer syntax of the stored data set (a context with it must be accepted).
    pub transfer_syntax: &'a str,
    /// The Part 10 file and its expected SHA-256 (hex).
    pub path: &'a Path,
    pub sha256: &'a str,
}

/// An established association we requested; aborted when dropped unless released.
pub struct Association {
    stream: Link,
    cfg: ScuConfig,
    peer: SocketAddr,
    accepted: Vec<AcceptedContext>,
    roles: Vec<RoleSelection>,
    peer_implementation: (String, String),
    sender: Sender,
    body: Vec<u8>,
    message_id: u16,
    open: bool,
}

fn ae_field(ae: &str, which: &str) -> Result<[u8; 16], AssociateError> {
    if !send::valid_ae(ae) {
        return Err(AssociateError::Invalid(format!(
            "{which} AE title {ae:?} is not 1-16 printable ASCII characters"
        )));
    }
    let mut raw = [b' '; 16];
    raw[..ae.len()].copy_from_slice(ae.as_bytes());
    Ok(raw)
}

fn connect(addr: &str, port: u16, timeout: Duration) -> Result<TcpStream, AssociateError> {
    let addrs: Vec<SocketAddr> = (addr, port)
        .to_socket_addrs()
        .map_err(|e| AssociateError::Connect(format!("{addr}:{port}: {e}")))?
        .take(8)
        .collect();
    let mut last = format!("{addr}:{port}: no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    Err(AssociateError::Connect(last))
}

impl Association {
    /// Connect to `host:port` and negotiate `contexts` (IDs 1, 3, 5... in this order) and the
    /// role selections `roles`. Succeeds when at least one context is accepted.
    pub fn request(
        host: &str,
        port: u16,
        cfg: ScuConfig,
        contexts: &[ContextProposal],
        roles: &[RoleSelection],
    ) -> Result<Association, AssociateError> {
        Self::request_over(host, port, None, cfg, contexts, roles)
    }

    /// [`Association::request`] over TLS when `tls` is given: the handshake (the peer verified
    /// for `host`) completes before the A-ASSOCIATE-RQ is sent.
    pub fn request_over(
        host: &str,
        port: u16,
        tls: Option<&TlsClient>,
        cfg: ScuConfig,
        contexts: &[ContextProposal],
        roles: &[RoleSelection],
    ) -> Result<Association, AssociateError> {
        let rq = Self::build_rq(&cfg, contexts, roles)?;
        let tcp = connect(host, port, cfg.connect_timeout)?;
        let peer = tcp
            .peer_addr()
            .map_err(|e| AssociateError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut stream = match tls {
            None => Link::Plain(tcp),
            Some(tls) => handshake(tcp, host, tls, cfg.acse_timeout, cfg.network_timeout)?,
        };
        let io = |e: std::io::Error| LinkError::Closed(format!("connection error: {e}"));
        stream
            .set_write_timeout(Some(cfg.network_timeout))
            .map_err(io)?;
        send::write_all(&mut stream, &pdu::encode_associate_rq(&rq))?;
        let mut body = Vec::new();
        let artim = Instant::now() + cfg.acse_timeout;
        let kind = send::read_pdu(
            &mut stream,
            &mut body,
            artim,
            cfg.network_timeout,
            0,
            &[
                (pdu::A_ASSOCIATE_AC, crate::server::MAX_ASSOCIATE_RQ),
                (pdu::A_ASSOCIATE_RJ, send::MAX_SMALL_PDU),
            ],
            "the A-ASSOCIATE-AC",
        )
        .map_err(|e| {
            if !matches!(e, LinkError::Closed(_)) {
                let _ = stream.write_all(&pdu::encode_abort(0, 0));
            }
            e
        })?;
        let abort = |mut stream: Link, why: String| {
            let _ = stream.write_all(&pdu::encode_abort(0, 0));
            stream.shutdown();
            AssociateError::Failed(LinkError::Protocol(why))
        };
        match kind {
            pdu::A_ASSOCIATE_AC => {}
            pdu::A_ASSOCIATE_RJ => {
                stream.shutdown();
                return Err(match body.as_slice() {
                    [_, result, source, reason] => AssociateError::Rejected {
                        result: *result,
                        source: *source,
                        reason: *reason,
                    },
                    _ => AssociateError::Failed(LinkError::Protocol(
                        "A-ASSOCIATE-RJ of the wrong length".into(),
                    )),
                });
            }
            pdu::A_ABORT => {
                let (source, reason) = match body.as_slice() {
                    [_, _, s, r, ..] => (*s, *r),
                    _ => (0, 0),
                };
                return Err(LinkError::PeerAborted { source, reason }.into());
            }
            other => {
                let why = format!("{} instead of an A-ASSOCIATE-AC", pdu::pdu_name(other));
                return Err(abort(stream, why));
            }
        }
        let ac = match pdu::parse_associate_ac(&body) {
            Ok(ac) => ac,
            Err(e) => return Err(abort(stream, format!("malformed A-ASSOCIATE-AC: {e}"))),
        };
        let mut accepted = Vec::new();
        for result in ac.contexts.iter().filter(|r| r.result == 0) {
            let Some(proposed) = rq.contexts.iter().find(|c| c.id == result.id) else {
                let why = format!(
                    "A-ASSOCIATE-AC accepts context {}, which was not proposed",
                    result.id
                );
                return Err(abort(stream, why));
            };
            if !proposed.transfer_syntaxes.contains(&result.transfer_syntax) {
                let why = format!(
                    "A-ASSOCIATE-AC accepts context {} with transfer syntax {:?}, which was not proposed",
                    result.id, result.transfer_syntax
                );
                return Err(abort(stream, why));
            }
            accepted.push(AcceptedContext {
                id: result.id,
                abstract_syntax: proposed.abstract_syntax.clone(),
                transfer_syntax: result.transfer_syntax.clone(),
            });
        }
        if accepted.is_empty() {
            let mut assoc = Self::established(stream, cfg, peer, ac, accepted, body);
            let _ = assoc.release();
            return Err(LinkError::Protocol("no presentation context was accepted".into()).into());
        }
        Ok(Self::established(stream, cfg, peer, ac, accepted, body))
    }

    fn build_rq(
        cfg: &ScuConfig,
        contexts: &[ContextProposal],
        roles: &[RoleSelection],
    ) -> Result<AssociateRq, AssociateError> {
        let invalid = |why: String| Err(AssociateError::Invalid(why));
        if contexts.is_empty() || contexts.len() > 128 {
            return invalid(format!(
                "{} presentation contexts proposed (1 to 128)",
                contexts.len()
            ));
        }
        let mut proposed = Vec::with_capacity(contexts.len());
        for (i, cx) in contexts.iter().enumerate() {
            let uids = std::iter::once(&cx.abstract_syntax).chain(&cx.transfer_syntaxes);
            if let Some(bad) = uids.into_iter().find(|u| !dimse::valid_uid(u)) {
                return invalid(format!("{bad:?} is not a valid UID"));
            }
            if cx.transfer_syntaxes.is_empty() {
                return invalid(format!("no transfer syntax for {}", cx.abstract_syntax));
            }
            proposed.push(ProposedContext {
                id: (2 * i + 1) as u8,
                abstract_syntax: cx.abstract_syntax.clone(),
                transfer_syntaxes: cx.transfer_syntaxes.clone(),
            });
        }
        if let Some(bad) = roles.iter().find(|r| !dimse::valid_uid(&r.sop_class)) {
            return invalid(format!("role selection for {:?}", bad.sop_class));
        }
        if !dimse::valid_uid(&cfg.implementation_class_uid) || cfg.implementation_version.len() > 16
        {
            return invalid("implementation class UID or version".into());
        }
        Ok(AssociateRq {
            protocol_version: 1,
            called_raw: ae_field(&cfg.called_ae, "called")?,
            calling_raw: ae_field(&cfg.calling_ae, "calling")?,
            application_context: pdu::APPLICATION_CONTEXT.into(),
            contexts: proposed,
            max_pdu: cfg.max_pdu,
            implementation_class_uid: cfg.implementation_class_uid.clone(),
            implementation_version: cfg.implementation_version.clone(),
            roles: roles.to_vec(),
        })
    }

    fn established(
        stream: Link,
        cfg: ScuConfig,
        peer: SocketAddr,
        ac: pdu::AssociateAccept,
        accepted: Vec<AcceptedContext>,
        body: Vec<u8>,
    ) -> Association {
        let settings = SendSettings {
            peer_max_pdu: ac.max_pdu,
            our_max_pdu: cfg.max_pdu,
            network_timeout: cfg.network_timeout,
            response_timeout: cfg.dimse_timeout,
            whole_read_limit: cfg.whole_read_limit,
        };
        Association {
            stream,
            cfg,
            peer,
            accepted,
            roles: ac.roles,
            peer_implementation: (ac.implementation_class_uid, ac.implementation_version),
            sender: Sender::new(settings),
            body,
            message_id: 0,
            open: true,
        }
    }

    /// The accepted presentation contexts.
    pub fn accepted(&self) -> &[AcceptedContext] {
        &self.accepted
    }

    /// The acceptor's SCP/SCU Role Selection replies.
    pub fn roles(&self) -> &[RoleSelection] {
        &self.roles
    }

    /// The acceptor's Maximum Length Received (0: unlimited).
    pub fn peer_max_pdu(&self) -> u32 {
        self.sender.settings.peer_max_pdu
    }

    /// The acceptor's implementation class UID and version.
    pub fn peer_implementation(&self) -> (&str, &str) {
        (&self.peer_implementation.0, &self.peer_implementation.1)
    }

    /// The acceptor's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// True until the association was released or aborted (by either side).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The first accepted context for `abstract_syntax` with `transfer_syntax`.
    pub fn context_for(
        &self,
        abstract_syntax: &str,
        transfer_syntax: &str,
    ) -> Option<&AcceptedContext> {
        self.accepted
            .iter()
            .find(|c| c.abstract_syntax == abstract_syntax && c.transfer_syntax == transfer_syntax)
    }

    fn next_message_id(&mut self) -> u16 {
        self.message_id = self.message_id.checked_add(1).unwrap_or(1);
        self.message_id
    }

    /// Send `instance` in a C-STORE-RQ (priority medium) and wait for its C-STORE-RSP.
    ///
    /// Without an accepted context for its SOP class and transfer syntax this is
    /// [`SendError::Unusable`] too: call [`Association::context_for`] first to tell the two
    /// apart.
    ///
    /// An error that leaves the association unusable ([`SendError::Link`]) aborts it (an
    /// A-ABORT is sent unless the peer aborted); later calls fail at once.
    pub fn send_store(
        &mut self,
        instance: &Instance<'_>,
        move_originator: Option<(&str, u16)>,
    ) -> Result<StoreOutcome, SendError> {
        if !self.open {
            return Err(LinkError::Closed("the association is closed".into()).into());
        }
        let Some(cx) = self.context_for(instance.sop_class_uid, instance.transfer_syntax) else {
            return Err(SendError::Unusable(format!(
                "no accepted presentation context for {} in {}",
                instance.sop_class_uid, instance.transfer_syntax
            )));
        };
        let context_id = cx.id;
        let message_id = self.next_message_id();
        let req = StoreRequest {
            context_id,
            transfer_syntax: instance.transfer_syntax,
            message_id,
            sop_class_uid: instance.sop_class_uid,
            sop_instance_uid: instance.sop_instance_uid,
            priority: 0,
            move_originator,
        };
        let result = self
            .sender
            .send_store(&mut self.stream, &req, instance.path, instance.sha256);
        if let Err(SendError::Link(e)) = &result {
            let peer_gone = matches!(e, LinkError::PeerAborted { .. } | LinkError::Closed(_));
            self.close(!peer_gone);
        }
        result
    }

    /// Release the association (A-RELEASE-RQ, then the A-RELEASE-RP within `acse_timeout`);
    /// the connection is closed whatever happens. Late P-DATA-TFs are ignored meanwhile; a
    /// release collision is answered.
    pub fn release(&mut self) -> Result<(), LinkError> {
        if !self.open {
            return Err(LinkError::Closed("the association is closed".into()));
        }
        let result = self.release_inner();
        self.close(matches!(
            result,
            Err(LinkError::Timeout(_) | LinkError::Protocol(_))
        ));
        result
    }

    fn release_inner(&mut self) -> Result<(), LinkError> {
        send::write_all(&mut self.stream, &pdu::encode_release_rq())?;
        let artim = Instant::now() + self.cfg.acse_timeout;
        loop {
            let kind = send::read_pdu(
                &mut self.stream,
                &mut self.body,
                artim,
                self.cfg.network_timeout,
                self.sender.settings.max_pdata_read(),
                &[],
                "the A-RELEASE-RP",
            )?;
            match kind {
                pdu::A_RELEASE_RP => return Ok(()),
                pdu::A_RELEASE_RQ => send::write_all(&mut self.stream, &pdu::encode_release_rp())?,
                pdu::A_ABORT => {
                    self.open = false;
                    let (source, reason) = match self.body.as_slice() {
                        [_, _, s, r, ..] => (*s, *r),
                        _ => (0, 0),
                    };
                    return Err(LinkError::PeerAborted { source, reason });
                }
                _ => {} // a late P-DATA-TF
            }
        }
    }

    /// Abort the association (A-ABORT, source service-user) and close the connection.
    pub fn abort(&mut self) {
        if self.open {
            self.close(true);
        }
    }

    fn close(&mut self, send_abort: bool) {
        let _ = self
            .stream
            .set_write_timeout(Some(Duration::from_millis(500)));
        if send_abort && self.open {
            let _ = self.stream.write_all(&pdu::encode_abort(0, 0));
        }
        self.open = false;
        self.stream.shutdown();
    }
}

impl Drop for Association {
    fn drop(&mut self) {
        self.abort();
    }
}

impl fmt::Debug for Association {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Association")
            .field("peer", &self.peer)
            .field("called_ae", &self.cfg.called_ae)
            .field("accepted", &self.accepted)
            .field("open", &self.open)
            .finish()
    }
}
