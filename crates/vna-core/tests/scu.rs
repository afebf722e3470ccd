//! The association requestor and C-STORE sending against DCMTK's `storescp` on loopback:
//! what storescp wrote (bit-preserving) must hold the sent data set byte for byte.
//!
//! Over TLS too (storescp +tls, certificates made with `openssl`).
//!
//! Skipped (with a line on stderr) when `storescp` or pydicom's test files are missing;
//! `VNA_PYDICOM_TEST_FILES` names another directory of those files.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vna_core::dimse;
use vna_core::scu::{
    AssociateError, Association, ContextProposal, Instance, ScuConfig, TlsClient, TlsSettings,
};
use vna_core::send::{self, LinkError, Part10Layout, SendError};

const PYDICOM_FILES: &str = "/work/main/.venv/lib/python3.11/site-packages/pydicom/data/test_files";
const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";
const EXPLICIT: &str = "1.2.840.10008.1.2.1";

/// A storescp process on a free loopback port, writing into its own directory; killed on drop.
struct StoreScp {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl StoreScp {
    /// What storescp logged so far (for failure messages).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("storescp.log")).unwrap_or_default()
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn have_storescp() -> bool {
    Command::new("storescp")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn storescp(name: &str, extra: &[&str]) -> Option<StoreScp> {
    if !have_storescp() {
        eprintln!("storescp not found: test skipped");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("vna-scu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.join("storescp.log")).unwrap();
    let child = Command::new("storescp")
        .args(["-od"])
        .arg(dir.join("out"))
        .args([
            "+B", "-pm", "+xa", "-dhl", "-v", "-aet", "STORESCP", "-ta", "10",
        ])
        .args(extra)
        .arg(port.to_string())
        .env("TCP_NODELAY", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut scp = StoreScp { child, port, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = scp.child.try_wait().unwrap() {
            panic!("storescp exited: {status}");
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(scp);
        }
        assert!(Instant::now() < deadline, "storescp not listening");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on loopback (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An association to `port` on loopback proposing `contexts`, without role selection.
fn request(
    port: u16,
    cfg: ScuConfig,
    contexts: &[ContextProposal],
) -> Result<Association, AssociateError> {
    Association::request("127.0.0.1", port, cfg, contexts, &[])
}

/// [`request`] over TLS with `client`, announcing a 16 KiB maximum PDU.
fn request_tls(
    port: u16,
    client: &TlsClient,
    contexts: &[ContextProposal],
) -> Result<Association, AssociateError> {
    Association::request_over(
        "127.0.0.1",
        port,
        Some(client),
        config(16384),
        contexts,
        &[],
    )
}

fn test_files() -> Option<PathBuf> {
    let dir = std::env::var_os("VNA_PYDICOM_TEST_FILES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(PYDICOM_FILES));
    if dir.join("CT_small.dcm").is_file() {
        Some(dir)
    } else {
        eprintln!("pydicom test files not found: test skipped");
        None
    }
}

fn config(max_pdu: u32) -> ScuConfig {
    ScuConfig {
        calling_ae: "VNA".into(),
        called_ae: "STORESCP".into(),
        max_pdu,
        implementation_class_uid: "1.2.826.0.1.3680043.10.1137.0.1".into(),
        implementation_version: "VNA_TEST".into(),
        connect_timeout: Duration::from_secs(5),
        acse_timeout: Duration::from_secs(10),
        network_timeout: Duration::from_secs(10),
        dimse_timeout: Duration::from_secs(30),
        whole_read_limit: send::WHOLE_READ_LIMIT,
    }
}

/// A stored file to send: its path, layout, digest and bytes.
struct Stored {
    path: PathBuf,
    layout: Part10Layout,
    sha256: String,
    bytes: Vec<u8>,
}

impl Stored {
    fn load(path: &Path) -> Stored {
        let bytes = std::fs::read(path).unwrap();
        let layout = send::read_layout(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Stored {
            path: path.to_path_buf(),
            sha256: format!("{:x}", Sha256::digest(&bytes)),
            layout,
            bytes,
        }
    }

    fn sop_class(&self) -> &str {
        self.layout.sop_class_uid.as_deref().unwrap()
    }

    fn sop_instance(&self) -> &str {
        self.layout.sop_instance_uid.as_deref().unwrap()
    }

    fn instance(&self) -> Instance<'_> {
        Instance {
            sop_class_uid: self.sop_class(),
            sop_instance_uid: self.sop_instance(),
            transfer_syntax: &self.layout.transfer_syntax,
            path: &self.path,
            sha256: &self.sha256,
        }
    }

    fn data_set(&self) -> &[u8] {
        &self.bytes[self.layout.data_set_offset as usize..]
    }
}

fn proposals(files: &[Stored]) -> Vec<ContextProposal> {
    let mut out: Vec<ContextProposal> = Vec::new();
    for f in files {
        let p = ContextProposal {
            abstract_syntax: f.sop_class().to_string(),
            transfer_syntaxes: vec![f.layout.transfer_syntax.clone()],
        };
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The files storescp wrote whose name ends with `sop_instance`.
fn written(scp: &StoreScp, sop_instance: &str) -> Vec<PathBuf> {
    std::fs::read_dir(scp.dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(sop_instance))
        })
        .collect()
}

/// storescp wrote `f` exactly once, its data set byte for byte, in the same transfer syntax.
fn assert_received(scp: &StoreScp, f: &Stored) {
    let paths = written(scp, f.sop_instance());
    assert_eq!(paths.len(), 1, "{}: {paths:?}", f.path.display());
    let got = std::fs::read(&paths[0]).unwrap();
    let layout = send::parse_file_meta(&got, got.len() as u64).unwrap();
    assert_eq!(layout.transfer_syntax, f.layout.transfer_syntax);
    assert!(
        got[layout.data_set_offset as usize..] == *f.data_set(),
        "{}: the data set storescp wrote differs",
        f.path.display()
    );
}

/// Distinct SOP Instance UIDs (storescp names its files by them).
const CORPUS: &[&str] = &[
    "CT_small.dcm",              // Explicit VR Little Endian
    "rtplan.dcm",                // Implicit VR Little Endian
    "MR_small_bigendian.dcm",    // Explicit VR Big Endian
    "SC_rgb_rle.dcm",            // RLE Lossless
    "JPEG2000.dcm",              // JPEG 2000
    "examples_jpeg2k.dcm",       // JPEG 2000 Lossless
    "SC_rgb_jpeg_dcmtk.dcm",     // JPEG Baseline
    "JPGExtended.dcm",           // JPEG Extended
    "JPEGLSNearLossless_08.dcm", // JPEG-LS Near Lossless
];

#[test]
fn sends_every_transfer_syntax_bit_exact() {
    let (Some(dir), Some(scp)) = (test_files(), storescp("corpus", &[])) else {
        return;
    };
    let files: Vec<Stored> = CORPUS.iter().map(|n| Stored::load(&dir.join(n))).collect();
    let mut assoc = request(scp.port, config(16384), &proposals(&files)).unwrap();
    assert_eq!(assoc.accepted().len(), proposals(&files).len());
    assert_eq!(assoc.peer_max_pdu(), 16384);
    for f in &files {
        let out = assoc
            .send_store(&f.instance(), Some(("MOVER", 42)))
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", f.path.display(), scp.log()));
        assert_eq!(out.response.status, 0, "{}", f.path.display());
        assert_eq!(out.cancel, None);
        assert_eq!(out.data_set_bytes, f.data_set().len() as u64);
        assert_eq!(
            out.response.affected_sop_instance.as_deref(),
            Some(f.sop_instance())
        );
    }
    assoc
        .release()
        .unwrap_or_else(|e| panic!("release: {e}\n{}", scp.log()));
    assert!(!assoc.is_open());
    for f in &files {
        assert_received(&scp, f);
    }
    // pydicom's deflated file has an odd-length data set (DCMTK aborts on it): declined,
    // nothing sent, the association carries on
    let deflated = Stored::load(&dir.join("image_dfl.dcm"));
    let proposal = ContextProposal {
        abstract_syntax: deflated.sop_class().to_string(),
        transfer_syntaxes: vec![deflated.layout.transfer_syntax.clone()],
    };
    let mut assoc = request(scp.port, config(16384), &[proposal]).unwrap();
    let err = assoc.send_store(&deflated.instance(), None).unwrap_err();
    assert!(matches!(err, SendError::Unusable(_)), "{err}");
    assert!(assoc.is_open());
    assoc.release().unwrap();
    assert!(written(&scp, deflated.sop_instance()).is_empty());
}

#[test]
fn a_small_peer_maximum_is_respected() {
    let (Some(dir), Some(scp)) = (test_files(), storescp("pdu", &["--max-pdu", "4096"])) else {
        return;
    };
    let files: Vec<Stored> = ["CT_small.dcm", "JPEG2000.dcm"]
        .iter()
        .map(|n| Stored::load(&dir.join(n)))
        .collect();
    // we announce no maximum: storescp may send us PDUs of any size
    let mut assoc = request(scp.port, config(0), &proposals(&files)).unwrap();
    assert_eq!(assoc.peer_max_pdu(), 4096);
    for f in &files {
        let out = assoc.send_store(&f.instance(), None).unwrap();
        assert_eq!(out.response.status, 0);
    }
    assoc.release().unwrap();
    for f in &files {
        assert_received(&scp, f);
    }
}

/// A Secondary Capture Part 10 file of about `size` bytes (vna's spool header, a few
/// identifying elements, an OB pixel data element), written to `path`.
fn large_file(path: &Path, size: usize, instance: &str) {
    let mut out = dimse::spool_header(SECONDARY_CAPTURE, instance, EXPLICIT, "1.2.3", "T");
    let mut short = |tag: (u16, u16), vr: &[u8; 2], value: &str| {
        let mut v = value.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(if vr == b"UI" { 0 } else { b' ' });
        }
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        out.extend_from_slice(&v);
    };
    short((0x0008, 0x0016), b"UI", SECONDARY_CAPTURE);
    short((0x0008, 0x0018), b"UI", instance);
    short((0x0008, 0x0060), b"CS", "OT");
    short((0x0020, 0x000D), b"UI", "1.2.826.0.1.3680043.10.1137.99.1");
    short((0x0020, 0x000E), b"UI", "1.2.826.0.1.3680043.10.1137.99.2");
    let n = size - out.len() - 12;
    out.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    // a pseudo-random block, each copy of it shifted by its index
    let mut x = 0x9E37_79B9u32;
    let block: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let start = out.len();
    out.resize(start + n, 0);
    for (i, chunk) in out[start..].chunks_mut(block.len()).enumerate() {
        chunk.copy_from_slice(&block[..chunk.len()]);
        chunk[0] = i as u8;
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn a_file_above_the_whole_read_bound_is_streamed() {
    let Some(scp) = storescp("large", &[]) else {
        return;
    };
    let path = scp.dir.join("large.dcm");
    let size = send::WHOLE_READ_LIMIT as usize + 8 * 1024 * 1024;
    large_file(&path, size, "1.2.826.0.1.3680043.10.1137.99.3");
    let f = Stored::load(&path);
    assert!(f.bytes.len() as u64 > send::WHOLE_READ_LIMIT);
    let mut assoc = request(
        scp.port,
        config(16384),
        &proposals(std::slice::from_ref(&f)),
    )
    .unwrap();
    let out = assoc.send_store(&f.instance(), None).unwrap();
    assert_eq!(out.response.status, 0);
    // a wrong digest on a streamed file: nothing sent, the association carries on
    let wrong = format!("{:x}", Sha256::digest(b"x"));
    let err = assoc
        .send_store(
            &Instance {
                sha256: &wrong,
                ..f.instance()
            },
            None,
        )
        .unwrap_err();
    assert!(matches!(err, SendError::DigestMismatch { .. }), "{err}");
    assert!(assoc.is_open());
    assoc.release().unwrap();
    assert_received(&scp, &f);
}

#[test]
fn a_digest_mismatch_sends_nothing_and_the_association_carries_on() {
    let (Some(dir), Some(scp)) = (test_files(), storescp("digest", &[])) else {
        return;
    };
    let ct = Stored::load(&dir.join("CT_small.dcm"));
    let mr = Stored::load(&dir.join("MR_small_implicit.dcm"));
    let files = [ct, mr];
    let mut assoc = request(scp.port, config(16384), &proposals(&files)).unwrap();
    let err = assoc
        .send_store(
            &Instance {
                sha256: &files[1].sha256,
                ..files[0].instance()
            },
            None,
        )
        .unwrap_err();
    match &err {
        SendError::DigestMismatch { expected, actual } => {
            assert_eq!(*expected, files[1].sha256);
            assert_eq!(*actual, files[0].sha256);
        }
        other => panic!("{other}"),
    }
    assert!(err.association_usable() && assoc.is_open());
    // the other copy (the right one) goes out on the same association
    for f in &files {
        assert_eq!(
            assoc
                .send_store(&f.instance(), None)
                .unwrap()
                .response
                .status,
            0
        );
    }
    assoc.release().unwrap();
    for f in &files {
        assert_received(&scp, f);
    }
}

#[test]
fn a_refused_association_is_reported() {
    let (Some(dir), Some(scp)) = (test_files(), storescp("refuse", &["--refuse"])) else {
        return;
    };
    let ct = Stored::load(&dir.join("CT_small.dcm"));
    let err = request(
        scp.port,
        config(16384),
        &proposals(std::slice::from_ref(&ct)),
    )
    .unwrap_err();
    assert!(
        matches!(err, AssociateError::Rejected { result: 1, .. }),
        "{err}"
    );
}

#[test]
fn nothing_listening_is_a_connect_error() {
    let port = free_port();
    let cx = ContextProposal {
        abstract_syntax: SECONDARY_CAPTURE.into(),
        transfer_syntaxes: vec![EXPLICIT.into()],
    };
    let err = request(port, config(16384), &[cx]).unwrap_err();
    assert!(matches!(err, AssociateError::Connect(_)), "{err}");
    // a malformed proposal is refused before connecting
    let err = request(port, config(16384), &[]).unwrap_err();
    assert!(matches!(err, AssociateError::Invalid(_)), "{err}");
}

#[test]
fn a_peer_abort_mid_send_ends_the_association() {
    let (Some(dir), Some(scp)) = (test_files(), storescp("abort", &["--abort-during"])) else {
        return;
    };
    let ct = Stored::load(&dir.join("CT_small.dcm"));
    let files = [ct];
    let mut assoc = request(scp.port, config(16384), &proposals(&files)).unwrap();
    let err = assoc.send_store(&files[0].instance(), None).unwrap_err();
    assert!(
        matches!(
            err,
            SendError::Link(LinkError::PeerAborted { .. } | LinkError::Closed(_))
        ),
        "{err}"
    );
    assert!(!err.association_usable() && !assoc.is_open());
    let again = assoc.send_store(&files[0].instance(), None).unwrap_err();
    assert!(
        matches!(again, SendError::Link(LinkError::Closed(_))),
        "{again}"
    );
    // a data set far larger than the socket buffers: the abort comes while we write
    let path = scp.dir.join("big.dcm");
    large_file(&path, 8 * 1024 * 1024, "1.2.826.0.1.3680043.10.1137.99.4");
    let big = [Stored::load(&path)];
    let mut assoc = request(scp.port, config(16384), &proposals(&big)).unwrap();
    let err = assoc.send_store(&big[0].instance(), None).unwrap_err();
    assert!(
        matches!(
            err,
            SendError::Link(LinkError::PeerAborted { .. } | LinkError::Closed(_))
        ),
        "{err}"
    );
    assert!(!assoc.is_open());
}

#[test]
fn a_stalled_peer_times_out_and_is_aborted() {
    let (Some(dir), Some(scp)) = (test_files(), storescp("stall", &["--sleep-during", "5"])) else {
        return;
    };
    let files = [Stored::load(&dir.join("CT_small.dcm"))];
    let mut cfg = config(16384);
    cfg.dimse_timeout = Duration::from_millis(800);
    let mut assoc = request(scp.port, cfg, &proposals(&files)).unwrap();
    // storescp answers after 5 s: only a working response deadline ends this in a timeout
    let err = assoc.send_store(&files[0].instance(), None).unwrap_err();
    assert!(
        matches!(err, SendError::Link(LinkError::Timeout(_))),
        "{err}"
    );
    assert!(!assoc.is_open());
}

/// A listener whose one connection gets `answer` after the A-ASSOCIATE-RQ arrived (or nothing),
/// then stays open until the requestor closes it.
fn hostile_acceptor(answer: Option<Vec<u8>>) -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut head = [0u8; 6];
        std::io::Read::read_exact(&mut conn, &mut head).unwrap();
        let len = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as usize;
        let mut body = vec![0u8; len];
        std::io::Read::read_exact(&mut conn, &mut body).unwrap();
        if let Some(answer) = answer {
            std::io::Write::write_all(&mut conn, &answer).unwrap();
        }
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut conn, &mut rest);
    });
    (port, thread)
}

#[test]
fn a_silent_or_garbled_acceptor_fails_the_association() {
    let cx = ContextProposal {
        abstract_syntax: SECONDARY_CAPTURE.into(),
        transfer_syntaxes: vec![EXPLICIT.into()],
    };
    let mut cfg = config(16384);
    cfg.acse_timeout = Duration::from_millis(500);
    // silent: ARTIM expires
    let (port, thread) = hostile_acceptor(None);
    let err = request(port, cfg.clone(), std::slice::from_ref(&cx)).unwrap_err();
    assert!(
        matches!(err, AssociateError::Failed(LinkError::Timeout(_))),
        "{err}"
    );
    thread.join().unwrap();
    // an A-ASSOCIATE-AC announcing 1 GiB: refused unread
    let mut huge = vec![0x02, 0];
    huge.extend_from_slice(&(1u32 << 30).to_be_bytes());
    let (port, thread) = hostile_acceptor(Some(huge));
    let err = request(port, cfg.clone(), std::slice::from_ref(&cx)).unwrap_err();
    assert!(
        matches!(err, AssociateError::Failed(LinkError::Protocol(_))),
        "{err}"
    );
    thread.join().unwrap();
    // an A-ASSOCIATE-AC too short for its fixed fields
    let (port, thread) = hostile_acceptor(Some(vec![0x02, 0, 0, 0, 0, 4, 0, 1, 0, 0]));
    let err = request(port, cfg, &[cx]).unwrap_err();
    assert!(
        matches!(err, AssociateError::Failed(LinkError::Protocol(_))),
        "{err}"
    );
    thread.join().unwrap();
}

/// Throwaway certificates made with the `openssl` command in their own directory; None (with
/// a line on stderr) when it is missing.
struct Pki {
    dir: PathBuf,
}

/// A certificate and its private key (PEM files).
type Pair = (PathBuf, PathBuf);

impl Pki {
    fn new(name: &str) -> Option<Pki> {
        let found = Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            eprintln!("openssl not found: test skipped");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("vna-pki-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Some(Pki { dir })
    }

    /// Run `openssl` in the directory with `args` (split at spaces: file names there, no spaces).
    fn openssl(&self, args: &str) {
        let args: Vec<&str> = args.split(' ').collect();
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pair(&self, name: &str) -> Pair {
        (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        )
    }

    /// A self-signed certificate (a CA, as `openssl req -x509` makes it) for `san`.
    fn self_signed(&self, name: &str, san: &str) -> Pair {
        self.openssl(&format!(
            "req -x509 {NEW_KEY} -keyout {name}.key -out {name}.crt -days 1 -subj /CN={name} \
             -addext subjectAltName={san}"
        ));
        self.pair(name)
    }

    /// An end-entity certificate for `san` signed by the CA `ca` (made by this `Pki`).
    fn leaf(&self, name: &str, san: &str, ca: &str, serial: u32) -> Pair {
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!("subjectAltName={san}\n"),
        )
        .unwrap();
        self.openssl(&format!(
            "req -new {NEW_KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}"
        ));
        self.openssl(&format!(
            "x509 -req -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -set_serial {serial} -days 1 \
             -out {name}.crt -extfile {name}.ext"
        ));
        self.pair(name)
    }

    /// A self-signed CA certificate for `san` that expired in 2020 (`openssl ca` sets past dates).
    fn expired_self_signed(&self, name: &str, san: &str) -> Pair {
        let conf = format!(
            "[ca]\ndefault_ca = this\n[this]\ndatabase = {name}.index\nnew_certs_dir = .\n\
             serial = {name}.serial\ndefault_md = sha256\npolicy = any\nx509_extensions = ext\n\
             [any]\ncommonName = supplied\n\
             [ext]\nbasicConstraints = critical,CA:true\nsubjectAltName = {san}\n"
        );
        std::fs::write(self.dir.join(format!("{name}.cnf")), conf).unwrap();
        std::fs::write(self.dir.join(format!("{name}.index")), "").unwrap();
        std::fs::write(self.dir.join(format!("{name}.serial")), "01\n").unwrap();
        self.openssl(&format!(
            "req -new {NEW_KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}"
        ));
        self.openssl(&format!(
            "ca -config {name}.cnf -selfsign -keyfile {name}.key -in {name}.csr -batch -notext \
             -startdate 20200101000000Z -enddate 20200102000000Z -out {name}.crt"
        ));
        self.pair(name)
    }
}

/// `openssl req` options for a new unencrypted P-256 key.
const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_client(ca: &Path, identity: Option<&Pair>) -> TlsClient {
    TlsClient::new(&TlsSettings {
        ca_file: Some(ca.to_path_buf()),
        identity: identity.cloned(),
    })
    .unwrap()
}

/// storescp serving TLS with `pair`, and `extra` options.
fn tls_storescp(name: &str, pair: &Pair, extra: &[&str]) -> Option<StoreScp> {
    let (crt, key) = (pair.0.to_str().unwrap(), pair.1.to_str().unwrap());
    storescp(name, &[&["+tls", key, crt], extra].concat())
}

#[test]
fn tls_sends_bit_exact_to_a_peer_the_ca_signed() {
    let (Some(dir), Some(pki)) = (test_files(), Pki::new("signed")) else {
        return;
    };
    let ca = pki.self_signed("ca", "DNS:ca.invalid");
    let dest = pki.leaf("dest", "DNS:localhost,IP:127.0.0.1", "ca", 1);
    let Some(scp) = tls_storescp("tls-signed", &dest, &["-ic"]) else {
        return;
    };
    let files: Vec<Stored> = CORPUS.iter().map(|n| Stored::load(&dir.join(n))).collect();
    let client = tls_client(&ca.0, None);
    let mut assoc = request_tls(scp.port, &client, &proposals(&files))
        .unwrap_or_else(|e| panic!("{e}\n{}", scp.log()));
    for f in &files {
        let out = assoc
            .send_store(&f.instance(), None)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", f.path.display(), scp.log()));
        assert_eq!(out.response.status, 0, "{}", f.path.display());
    }
    assoc
        .release()
        .unwrap_or_else(|e| panic!("release: {e}\n{}", scp.log()));
    for f in &files {
        assert_received(&scp, f);
    }
}

#[test]
fn tls_mutual_with_a_self_signed_peer_certificate_from_the_bundle() {
    let (Some(dir), Some(pki)) = (test_files(), Pki::new("mutual")) else {
        return;
    };
    let dest = pki.self_signed("dest", "DNS:localhost,IP:127.0.0.1");
    let ours = pki.self_signed("vna", "DNS:vna.invalid");
    // storescp requires a client certificate (-rc, its default) that `ours` is
    let ours_crt = ours.0.to_str().unwrap();
    let Some(scp) = tls_storescp("tls-mutual", &dest, &["+cf", ours_crt]) else {
        return;
    };
    let ct = Stored::load(&dir.join("CT_small.dcm"));
    let cx = proposals(std::slice::from_ref(&ct));
    let anonymous = tls_client(&dest.0, None);
    let err = request_tls(scp.port, &anonymous, &cx).unwrap_err();
    assert!(
        matches!(err, AssociateError::Failed(_) | AssociateError::Connect(_)),
        "{err}"
    );
    let client = tls_client(&dest.0, Some(&ours));
    let mut assoc =
        request_tls(scp.port, &client, &cx).unwrap_or_else(|e| panic!("{e}\n{}", scp.log()));
    assert_eq!(
        assoc
            .send_store(&ct.instance(), None)
            .unwrap()
            .response
            .status,
        0
    );
    assoc.release().unwrap();
    assert_received(&scp, &ct);
}

#[test]
fn tls_a_peer_that_cannot_be_verified_gets_no_dicom_byte() {
    let (Some(dir), Some(pki)) = (test_files(), Pki::new("unverified")) else {
        return;
    };
    let ca = pki.self_signed("ca", "DNS:ca.invalid");
    pki.self_signed("other-ca", "DNS:other.invalid");
    // self-signed certificates the bundle holds, but expired or for another name
    let expired = pki.expired_self_signed("expired", "DNS:localhost,IP:127.0.0.1");
    let misnamed = pki.self_signed("misnamed", "DNS:elsewhere.invalid");
    let bundle = pki.dir.join("bundle.pem");
    let pem = |p: &Path| std::fs::read_to_string(p).unwrap();
    std::fs::write(
        &bundle,
        [pem(&ca.0), pem(&expired.0), pem(&misnamed.0)].concat(),
    )
    .unwrap();
    let peers = [
        (
            "stranger",
            pki.self_signed("stranger", "DNS:localhost,IP:127.0.0.1"),
            "not in the CA bundle",
        ),
        (
            "foreign",
            pki.leaf("foreign", "DNS:localhost,IP:127.0.0.1", "other-ca", 2),
            "UnknownIssuer",
        ),
        (
            "elsewhere",
            pki.leaf("elsewhere", "DNS:elsewhere.invalid", "ca", 3),
            "not valid for name",
        ),
        ("expired", expired, "expired"),
        ("misnamed", misnamed, "not valid for name"),
    ];
    let ct = Stored::load(&dir.join("CT_small.dcm"));
    let client = tls_client(&bundle, None);
    for (name, pair, why) in &peers {
        let Some(scp) = tls_storescp(&format!("tls-{name}"), pair, &["-ic"]) else {
            return;
        };
        let err =
            request_tls(scp.port, &client, &proposals(std::slice::from_ref(&ct))).unwrap_err();
        assert!(
            matches!(&err, AssociateError::Connect(e) if e.contains("TLS handshake") && e.contains(why)),
            "{name}: {err}"
        );
        assert!(
            !scp.log().contains("Association Received"),
            "{name}: {}",
            scp.log()
        );
        assert!(written(&scp, ct.sop_instance()).is_empty());
    }
}

#[test]
fn tls_settings_that_cannot_be_loaded_name_their_file() {
    let Some(pki) = Pki::new("settings") else {
        return;
    };
    let ca = pki.self_signed("ca", "DNS:ca.invalid");
    let missing = pki.dir.join("missing.pem");
    let empty = pki.dir.join("empty.pem");
    std::fs::write(&empty, b"").unwrap();
    for (ca_file, identity, named) in [
        (&missing, None, &missing),
        (&empty, None, &empty),
        (&ca.0, Some((ca.0.clone(), missing.clone())), &missing),
    ] {
        let settings = TlsSettings {
            ca_file: Some(ca_file.clone()),
            identity,
        };
        let err = TlsClient::new(&settings).unwrap_err();
        assert!(err.contains(named.to_str().unwrap()), "{err}");
    }
    TlsClient::new(&TlsSettings {
        ca_file: Some(ca.0.clone()),
        identity: Some(ca.clone()),
    })
    .unwrap();
}
