//! C-STORE sending, ours against DCMTK's `storescu`, to one DCMTK `storescp --ignore` on
//! loopback (a benchmark, not a test): N instances of one Part 10 file on one association.
//!
//! `cargo run --release -p vna-core --example send_bench -- FILE [N]`
//! Prints instances per second for each sender and the ratio ours / storescu.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vna_core::scu::{Association, ContextProposal, Instance, ScuConfig};
use vna_core::send;

fn main() {
    let mut args = std::env::args().skip(1);
    let file = PathBuf::from(args.next().expect("usage: send_bench FILE [N]"));
    let n: usize = args.next().map_or(500, |a| a.parse().expect("N"));
    let layout = send::read_layout(&file).expect("a Part 10 file");
    let bytes = std::fs::read(&file).unwrap();
    let sha = format!("{:x}", Sha256::digest(&bytes));
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut scp = Command::new("storescp")
        .args(["--ignore", "-pm", "+xa", "-dhl", "-aet", "STORESCP"])
        .arg(port.to_string())
        .env("TCP_NODELAY", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("storescp");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "storescp not listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sop_class = layout.sop_class_uid.clone().unwrap();
    let sop_instance = layout.sop_instance_uid.clone().unwrap();

    let cfg = ScuConfig {
        calling_ae: "VNA".into(),
        called_ae: "STORESCP".into(),
        max_pdu: 16384,
        implementation_class_uid: "1.2.826.0.1.3680043.10.1137.0.1".into(),
        implementation_version: "VNA_BENCH".into(),
        connect_timeout: Duration::from_secs(5),
        acse_timeout: Duration::from_secs(10),
        network_timeout: Duration::from_secs(10),
        dimse_timeout: Duration::from_secs(30),
        whole_read_limit: send::WHOLE_READ_LIMIT,
    };
    let cx = ContextProposal {
        abstract_syntax: sop_class.clone(),
        transfer_syntaxes: vec![layout.transfer_syntax.clone()],
    };
    let instance = Instance {
        sop_class_uid: &sop_class,
        sop_instance_uid: &sop_instance,
        transfer_syntax: &layout.transfer_syntax,
        path: &file,
        sha256: &sha,
    };
    let started = Instant::now();
    let mut assoc = Association::request("127.0.0.1", port, cfg, &[cx], &[]).unwrap();
    for _ in 0..n {
        let out = assoc.send_store(&instance, None).unwrap();
        assert_eq!(out.response.status, 0);
    }
    assoc.release().unwrap();
    let ours = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let status = Command::new("storescu")
        .args(["-aec", "STORESCP"])
        .arg("127.0.0.1")
        .arg(port.to_string())
        .args(std::iter::repeat(&file).take(n))
        .env("TCP_NODELAY", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("storescu");
    let theirs = started.elapsed().as_secs_f64();
    assert!(status.success(), "storescu failed");
    let _ = scp.kill();
    let _ = scp.wait();

    let size = bytes.len();
    println!(
        "{n} x {} ({size} bytes) to storescp --ignore",
        file.display()
    );
    println!(
        "vna-core scu : {:8.1} inst/s ({ours:.3} s)",
        n as f64 / ours
    );
    println!(
        "storescu     : {:8.1} inst/s ({theirs:.3} s)",
        n as f64 / theirs
    );
    println!("ratio vna/storescu: {:.2}", theirs / ours);
}
