//! vna's DICOM wire and blob writer, without Python: Upper Layer PDUs ([`pdu`]), presentation context
//! negotiation ([`negotiate`]), DIMSE command sets and the spool header ([`dimse`]),
//! C-STORE sending from a verified stored file ([`send`]), an association requestor
//! ([`scu`]), a listener serving every service of the DICOM port ([`server`]), and the
//! atomic create-new writer of the filesystem blob stores ([`blob`]).
//!
//! The PDU layer is hand-written rather than taken from `dicom-ul`: its reader applies
//! one maximum length to every PDU type (an A-ASSOCIATE-RQ and a P-DATA-TF need
//! different bounds), copies every PDV into a new vector, and its acceptor negotiates
//! with its own rules, whereas the stored bytes must follow pynetdicom's choice of
//! transfer syntax.

pub mod blob;
pub mod dimse;
pub mod negotiate;
pub mod part10;
pub mod pdu;
pub mod scu;
pub mod send;
pub mod server;
