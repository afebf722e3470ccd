//! Upper Layer PDUs (PS3.8 9.3): the A-ASSOCIATE-RQ parser, the encoders of the
//! PDUs an acceptor sends, and the P-DATA-TF splitter.
//!
//! Every parser works on a PDU body already read (bounded by the caller); no single
//! allocation it makes is larger than that bound (at most [`MAX_CONTEXTS`] contexts, one
//! User Information item, PDVs split in place); every length field is checked against the
//! bytes that are actually there.

use std::fmt;

pub const A_ASSOCIATE_RQ: u8 = 0x01;
pub const A_ASSOCIATE_AC: u8 = 0x02;
pub const A_ASSOCIATE_RJ: u8 = 0x03;
pub const P_DATA_TF: u8 = 0x04;
pub const A_RELEASE_RQ: u8 = 0x05;
pub const A_RELEASE_RP: u8 = 0x06;
pub const A_ABORT: u8 = 0x07;

/// The most presentation contexts an A-ASSOCIATE-RQ or -AC may carry: their IDs are the odd
/// numbers 1-255 (PS3.8 9.3.2.2). With this and one User Information item, no vector a parser
/// builds is larger than the PDU body's bound.
pub const MAX_CONTEXTS: usize = 128;

/// The DICOM Application Context Name (PS3.7 A.2.1).
pub const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";

/// A malformed PDU: what was wrong, for one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PduError(pub String);

impl fmt::Display for PduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PduError {}

fn err<T>(what: impl Into<String>) -> Result<T, PduError> {
    Err(PduError(what.into()))
}

/// The name of a PDU type, for log lines.
pub fn pdu_name(pdu_type: u8) -> &'static str {
    match pdu_type {
        A_ASSOCIATE_RQ => "A-ASSOCIATE-RQ",
        A_ASSOCIATE_AC => "A-ASSOCIATE-AC",
        A_ASSOCIATE_RJ => "A-ASSOCIATE-RJ",
        P_DATA_TF => "P-DATA-TF",
        A_RELEASE_RQ => "A-RELEASE-RQ",
        A_RELEASE_RP => "A-RELEASE-RP",
        A_ABORT => "A-ABORT",
        _ => "unknown PDU",
    }
}

/// A 6-byte PDU header: (type, length of the body that follows).
pub fn parse_header(raw: &[u8; 6]) -> (u8, u32) {
    (raw[0], u32::from_be_bytes([raw[2], raw[3], raw[4], raw[5]]))
}

/// One proposed presentation context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProposedContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntaxes: Vec<String>,
}

/// An SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSelection {
    pub sop_class: String,
    pub scu: bool,
    pub scp: bool,
}

/// A parsed A-ASSOCIATE-RQ.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AssociateRq {
    pub protocol_version: u16,
    /// The 16 bytes of the Called AE Title field, as sent.
    pub called_raw: [u8; 16],
    /// The 16 bytes of the Calling AE Title field, as sent.
    pub calling_raw: [u8; 16],
    pub application_context: String,
    pub contexts: Vec<ProposedContext>,
    /// The requestor's Maximum Length Received (0: unlimited).
    pub max_pdu: u32,
    pub implementation_class_uid: String,
    pub implementation_version: String,
    pub roles: Vec<RoleSelection>,
}

impl AssociateRq {
    /// The calling AE title, leading and trailing spaces removed (lossy for non-ASCII bytes).
    pub fn calling_ae(&self) -> String {
        ae_text(&self.calling_raw)
    }

    /// The called AE title, leading and trailing spaces removed.
    pub fn called_ae(&self) -> String {
        ae_text(&self.called_raw)
    }
}

fn ae_text(raw: &[u8; 16]) -> String {
    String::from_utf8_lossy(raw)
        .trim_matches(|c: char| c == ' ' || c == '\0')
        .to_string()
}

/// A UID or text field: trailing NUL and space padding removed, ASCII only.
fn uid_text(raw: &[u8], name: &str) -> Result<String, PduError> {
    if !raw.is_ascii() {
        return err(format!("non-ASCII bytes in its {name}"));
    }
    let text = std::str::from_utf8(raw).unwrap_or_default();
    Ok(text.trim_end_matches(['\0', ' ']).to_string())
}

/// Iterate over the items `type(1) reserved(1) length(2) value` of `raw`.
fn items(raw: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8]), PduError>> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= raw.len() {
            return None;
        }
        if raw.len() - pos < 4 {
            pos = raw.len();
            return Some(err("truncated item header"));
        }
        let kind = raw[pos];
        let len = u16::from_be_bytes([raw[pos + 2], raw[pos + 3]]) as usize;
        let start = pos + 4;
        if raw.len() - start < len {
            pos = raw.len();
            return Some(err(format!("item 0x{kind:02X} longer than its PDU")));
        }
        pos = start + len;
        Some(Ok((kind, &raw[start..start + len])))
    })
}

/// Parse the body (after the 6-byte header) of an A-ASSOCIATE-RQ.
pub fn parse_associate_rq(body: &[u8]) -> Result<AssociateRq, PduError> {
    if body.len() < 68 {
        return err("A-ASSOCIATE-RQ shorter than its fixed fields");
    }
    let mut rq = AssociateRq {
        protocol_version: u16::from_be_bytes([body[0], body[1]]),
        ..AssociateRq::default()
    };
    rq.called_raw.copy_from_slice(&body[4..20]);
    rq.calling_raw.copy_from_slice(&body[20..36]);
    if !body[4..36].is_ascii() {
        return err("non-ASCII bytes in an AE title");
    }
    let mut seen_app = false;
    let mut seen_user = false;
    for item in items(&body[68..]) {
        let (kind, value) = item?;
        match kind {
            0x10 => {
                rq.application_context = uid_text(value, "Application Context Name")?;
                seen_app = true;
            }
            0x20 if rq.contexts.len() == MAX_CONTEXTS => {
                return err(format!("more than {MAX_CONTEXTS} presentation contexts"))
            }
            0x20 => rq.contexts.push(parse_proposed_context(value)?),
            0x50 if seen_user => return err("a second User Information item"),
            0x50 => {
                parse_user_info(value, &mut rq)?;
                seen_user = true;
            }
            _ => return err(format!("unexpected item 0x{kind:02X} in A-ASSOCIATE-RQ")),
        }
    }
    if !seen_app {
        return err("A-ASSOCIATE-RQ without an Application Context item");
    }
    if rq.contexts.is_empty() {
        return err("A-ASSOCIATE-RQ without a presentation context");
    }
    if !seen_user {
        return err("A-ASSOCIATE-RQ without a User Information item");
    }
    Ok(rq)
}

fn parse_proposed_context(value: &[u8]) -> Result<ProposedContext, PduError> {
    if value.len() < 4 {
        return err("presentation context item too short");
    }
    let mut cx = ProposedContext {
        id: value[0],
        abstract_syntax: String::new(),
        transfer_syntaxes: Vec::new(),
    };
    let mut abstract_seen = false;
    for item in items(&value[4..]) {
        let (kind, raw) = item?;
        match kind {
            0x30 if !abstract_seen => {
                cx.abstract_syntax = uid_text(raw, "Abstract Syntax")?;
                abstract_seen = true;
            }
            0x40 => cx.transfer_syntaxes.push(uid_text(raw, "Transfer Syntax")?),
            _ => {
                return err(format!(
                    "unexpected sub-item 0x{kind:02X} in a presentation context"
                ))
            }
        }
    }
    if !abstract_seen || cx.transfer_syntaxes.is_empty() {
        return err("presentation context without an abstract or a transfer syntax");
    }
    if cx.id % 2 == 0 {
        return err("even presentation context ID");
    }
    Ok(cx)
}

fn parse_user_info(value: &[u8], rq: &mut AssociateRq) -> Result<(), PduError> {
    for item in items(value) {
        let (kind, raw) = item?;
        match kind {
            0x51 => {
                if raw.len() != 4 {
                    return err("Maximum Length sub-item is not 4 bytes");
                }
                rq.max_pdu = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
            }
            0x52 => rq.implementation_class_uid = uid_text(raw, "Implementation Class UID")?,
            0x55 => rq.implementation_version = String::from_utf8_lossy(raw).trim_end().to_string(),
            0x54 => {
                if raw.len() < 4 {
                    return err("Role Selection sub-item too short");
                }
                let n = u16::from_be_bytes([raw[0], raw[1]]) as usize;
                if raw.len() != n + 4 {
                    return err("Role Selection sub-item length mismatch");
                }
                rq.roles.push(RoleSelection {
                    sop_class: uid_text(&raw[2..2 + n], "SCP/SCU Role Selection")?,
                    scu: raw[2 + n] != 0,
                    scp: raw[3 + n] != 0,
                });
            }
            // asynchronous operations window, extended/common extended negotiation,
            // user identity: not negotiated (not answered), so not interpreted
            0x53 | 0x56 | 0x57 | 0x58 => {}
            _ => {} // unknown sub-items are ignored (PS3.7 D.3.3)
        }
    }
    Ok(())
}

fn push_item(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

fn pdu(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + body.len());
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The result of one presentation context in an A-ASSOCIATE-AC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextResult {
    pub id: u8,
    /// 0 acceptance, 1 user rejection, 2 no reason, 3 abstract syntax not supported,
    /// 4 transfer syntaxes not supported (PS3.8 9.3.3.2).
    pub result: u8,
    pub transfer_syntax: String,
}

/// What the acceptor puts in its A-ASSOCIATE-AC.
#[derive(Debug, Clone)]
pub struct AssociateAc<'a> {
    pub rq: &'a AssociateRq,
    pub contexts: &'a [ContextResult],
    pub roles: &'a [RoleSelection],
    pub max_pdu: u32,
    pub implementation_class_uid: &'a str,
    pub implementation_version: &'a str,
}

/// Encode an A-ASSOCIATE-AC (header included).
pub fn encode_associate_ac(ac: &AssociateAc<'_>) -> Vec<u8> {
    let mut body = Vec::with_capacity(256 + 64 * ac.contexts.len());
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(&ac.rq.called_raw);
    body.extend_from_slice(&ac.rq.calling_raw);
    body.extend_from_slice(&[0u8; 32]);
    push_item(&mut body, 0x10, APPLICATION_CONTEXT.as_bytes());
    for cx in ac.contexts {
        let mut value = vec![cx.id, 0, cx.result, 0];
        push_item(&mut value, 0x40, cx.transfer_syntax.as_bytes());
        push_item(&mut body, 0x21, &value);
    }
    let user = user_information(
        ac.max_pdu,
        ac.implementation_class_uid,
        ac.implementation_version,
        ac.roles,
    );
    push_item(&mut body, 0x50, &user);
    pdu(A_ASSOCIATE_AC, &body)
}

/// The User Information item's value (PS3.8 9.3.2.3 / 9.3.3.3): max PDU, implementation class UID,
/// SCP/SCU role selections, implementation version name (when not empty).
fn user_information(
    max_pdu: u32,
    class_uid: &str,
    version: &str,
    roles: &[RoleSelection],
) -> Vec<u8> {
    let mut user = Vec::with_capacity(128);
    push_item(&mut user, 0x51, &max_pdu.to_be_bytes());
    push_item(&mut user, 0x52, class_uid.as_bytes());
    for role in roles {
        let mut value = Vec::with_capacity(role.sop_class.len() + 4);
        value.extend_from_slice(&(role.sop_class.len() as u16).to_be_bytes());
        value.extend_from_slice(role.sop_class.as_bytes());
        value.push(role.scu as u8);
        value.push(role.scp as u8);
        push_item(&mut user, 0x54, &value);
    }
    if !version.is_empty() {
        push_item(&mut user, 0x55, version.as_bytes());
    }
    user
}

/// An A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent / 2 transient, source, reason.
pub fn encode_associate_rj(result: u8, source: u8, reason: u8) -> Vec<u8> {
    pdu(A_ASSOCIATE_RJ, &[0, result, source, reason])
}

/// An A-RELEASE-RP.
pub fn encode_release_rp() -> Vec<u8> {
    pdu(A_RELEASE_RP, &[0, 0, 0, 0])
}

/// An A-ABORT: source 0 service-user, 2 service-provider; reason (PS3.8 9.3.8).
pub fn encode_abort(source: u8, reason: u8) -> Vec<u8> {
    pdu(A_ABORT, &[0, 0, source, reason])
}

/// One PDV of a P-DATA-TF: context ID, message control header, data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pdv<'a> {
    pub context_id: u8,
    pub control: u8,
    pub data: &'a [u8],
}

impl Pdv<'_> {
    /// True for a fragment of a command set, false for a data set.
    pub fn is_command(&self) -> bool {
        self.control & 1 != 0
    }

    /// True for the last fragment of its command or data set.
    pub fn is_last(&self) -> bool {
        self.control & 2 != 0
    }
}

/// The PDVs of a P-DATA-TF body that [`split_pdvs`] checked; iterating copies and allocates
/// nothing.
#[derive(Debug, Clone)]
pub struct Pdvs<'a> {
    body: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for Pdvs<'a> {
    type Item = Pdv<'a>;

    fn next(&mut self) -> Option<Pdv<'a>> {
        let body = self.body;
        let pos = self.pos;
        if body.len() - pos < 6 {
            return None;
        }
        // checked by split_pdvs: the length fits the body and is at least 2
        let len =
            u32::from_be_bytes([body[pos], body[pos + 1], body[pos + 2], body[pos + 3]]) as usize;
        self.pos = pos + 4 + len;
        Some(Pdv {
            context_id: body[pos + 4],
            control: body[pos + 5],
            data: &body[pos + 6..pos + 4 + len],
        })
    }
}

/// Split a P-DATA-TF body into its PDVs; an error when the items do not exactly fill it.
///
/// The whole body is checked before the first PDV is returned, and nothing is allocated
/// (a vector of PDVs would be several times the body: a PDV header is 6 bytes).
pub fn split_pdvs(body: &[u8]) -> Result<Pdvs<'_>, PduError> {
    let mut pos = 0usize;
    while pos < body.len() {
        if body.len() - pos < 6 {
            return err("truncated PDV header");
        }
        let len =
            u32::from_be_bytes([body[pos], body[pos + 1], body[pos + 2], body[pos + 3]]) as usize;
        if len < 2 || len > body.len() - pos - 4 {
            return err("PDV length does not fit its PDU");
        }
        pos += 4 + len;
    }
    if body.is_empty() {
        return err("P-DATA-TF without a PDV");
    }
    Ok(Pdvs { body, pos: 0 })
}

/// A P-DATA-TF (header included) carrying `data` in PDVs of at most `max_pdu` bytes per PDU
/// (0: one PDU), the last one flagged as the last fragment.
pub fn encode_pdata(context_id: u8, command: bool, data: &[u8], max_pdu: u32) -> Vec<u8> {
    let room = if max_pdu == 0 {
        data.len().max(1)
    } else {
        (max_pdu as usize).saturating_sub(6).max(1)
    };
    let mut out = Vec::with_capacity(data.len() + 12 * (data.len() / room + 1));
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![data]
    } else {
        data.chunks(room).collect()
    };
    let n = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let control = (command as u8) | if i + 1 == n { 2 } else { 0 };
        out.push(P_DATA_TF);
        out.push(0);
        out.extend_from_slice(&(chunk.len() as u32 + 6).to_be_bytes());
        out.extend_from_slice(&(chunk.len() as u32 + 2).to_be_bytes());
        out.push(context_id);
        out.push(control);
        out.extend_from_slice(chunk);
    }
    out
}

/// Encode an A-ASSOCIATE-RQ (header included) from `rq`: its AE title fields, application
/// context, presentation contexts, Maximum Length, implementation class UID and version, and an
/// SCP/SCU Role Selection sub-item per entry of `rq.roles`.
pub fn encode_associate_rq(rq: &AssociateRq) -> Vec<u8> {
    let mut body = Vec::with_capacity(256 + 128 * rq.contexts.len());
    body.extend_from_slice(&rq.protocol_version.to_be_bytes());
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(&rq.called_raw);
    body.extend_from_slice(&rq.calling_raw);
    body.extend_from_slice(&[0u8; 32]);
    push_item(&mut body, 0x10, rq.application_context.as_bytes());
    for cx in &rq.contexts {
        let mut value = vec![cx.id, 0, 0, 0];
        push_item(&mut value, 0x30, cx.abstract_syntax.as_bytes());
        for ts in &cx.transfer_syntaxes {
            push_item(&mut value, 0x40, ts.as_bytes());
        }
        push_item(&mut body, 0x20, &value);
    }
    let user = user_information(
        rq.max_pdu,
        &rq.implementation_class_uid,
        &rq.implementation_version,
        &rq.roles,
    );
    push_item(&mut body, 0x50, &user);
    pdu(A_ASSOCIATE_RQ, &body)
}

/// A parsed A-ASSOCIATE-AC.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AssociateAccept {
    pub protocol_version: u16,
    pub application_context: String,
    /// One result per presentation context answered (the transfer syntax is empty when absent).
    pub contexts: Vec<ContextResult>,
    /// The acceptor's Maximum Length Received (0: unlimited).
    pub max_pdu: u32,
    pub implementation_class_uid: String,
    pub implementation_version: String,
    /// The acceptor's SCP/SCU Role Selection replies.
    pub roles: Vec<RoleSelection>,
}

/// Parse the body (after the 6-byte header) of an A-ASSOCIATE-AC.
pub fn parse_associate_ac(body: &[u8]) -> Result<AssociateAccept, PduError> {
    if body.len() < 68 {
        return err("A-ASSOCIATE-AC shorter than its fixed fields");
    }
    let mut ac = AssociateAccept {
        protocol_version: u16::from_be_bytes([body[0], body[1]]),
        ..AssociateAccept::default()
    };
    let mut user_seen = false;
    for item in items(&body[68..]) {
        let (kind, value) = item?;
        match kind {
            0x10 => ac.application_context = uid_text(value, "Application Context Name")?,
            0x21 if ac.contexts.len() == MAX_CONTEXTS => {
                return err(format!(
                    "more than {MAX_CONTEXTS} presentation context results"
                ))
            }
            0x21 => {
                if value.len() < 4 {
                    return err("presentation context result item too short");
                }
                let mut transfer_syntax = String::new();
                for sub in items(&value[4..]) {
                    let (sub_kind, raw) = sub?;
                    if sub_kind == 0x40 {
                        transfer_syntax = uid_text(raw, "Transfer Syntax")?;
                    }
                }
                ac.contexts.push(ContextResult {
                    id: value[0],
                    result: value[2],
                    transfer_syntax,
                });
            }
            0x50 => {
                let mut user = AssociateRq::default();
                parse_user_info(value, &mut user)?;
                ac.max_pdu = user.max_pdu;
                ac.implementation_class_uid = user.implementation_class_uid;
                ac.implementation_version = user.implementation_version;
                ac.roles = user.roles;
                user_seen = true;
            }
            _ => return err(format!("unexpected item 0x{kind:02X} in A-ASSOCIATE-AC")),
        }
    }
    if !user_seen {
        return err("A-ASSOCIATE-AC without a User Information item");
    }
    Ok(ac)
}

/// An A-RELEASE-RQ.
pub fn encode_release_rq() -> Vec<u8> {
    pdu(A_RELEASE_RQ, &[0, 0, 0, 0])
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn rq_body(
        contexts: &[(u8, &str, &[&str])],
        roles: &[(&str, bool, bool)],
    ) -> Vec<u8> {
        let mut body = vec![0, 1, 0, 0];
        body.extend_from_slice(b"VNA             ");
        body.extend_from_slice(b"STORESCU        ");
        body.extend_from_slice(&[0u8; 32]);
        push_item(&mut body, 0x10, APPLICATION_CONTEXT.as_bytes());
        for (id, abs, tss) in contexts {
            let mut v = vec![*id, 0, 0, 0];
            push_item(&mut v, 0x30, abs.as_bytes());
            for ts in *tss {
                push_item(&mut v, 0x40, ts.as_bytes());
            }
            push_item(&mut body, 0x20, &v);
        }
        let mut user = Vec::new();
        push_item(&mut user, 0x51, &16384u32.to_be_bytes());
        push_item(&mut user, 0x52, b"1.2.3.4");
        for (uid, scu, scp) in roles {
            let mut v = (uid.len() as u16).to_be_bytes().to_vec();
            v.extend_from_slice(uid.as_bytes());
            v.push(*scu as u8);
            v.push(*scp as u8);
            push_item(&mut user, 0x54, &v);
        }
        push_item(&mut user, 0x55, b"TEST_1");
        push_item(&mut body, 0x50, &user);
        body
    }

    #[test]
    fn parses_a_request() {
        let body = rq_body(
            &[(1, "1.2.840.10008.1.1", &["1.2.840.10008.1.2"])],
            &[("1.2.3", true, false)],
        );
        let rq = parse_associate_rq(&body).unwrap();
        assert_eq!(rq.calling_ae(), "STORESCU");
        assert_eq!(rq.called_ae(), "VNA");
        assert_eq!(rq.max_pdu, 16384);
        assert_eq!(rq.contexts[0].abstract_syntax, "1.2.840.10008.1.1");
        assert_eq!(rq.contexts[0].transfer_syntaxes, vec!["1.2.840.10008.1.2"]);
        assert_eq!(rq.implementation_version, "TEST_1");
        assert_eq!(
            rq.roles,
            vec![RoleSelection {
                sop_class: "1.2.3".into(),
                scu: true,
                scp: false
            }]
        );
    }

    #[test]
    fn rejects_lying_item_lengths() {
        let mut body = rq_body(&[(1, "1.2.840.10008.1.1", &["1.2.840.10008.1.2"])], &[]);
        body[70] = 0xFF; // application context item length
        body[71] = 0xFF;
        assert!(parse_associate_rq(&body).is_err());
        assert!(parse_associate_rq(&body[..50]).is_err());
    }

    #[test]
    fn pdvs_must_fill_the_body() {
        let pdu = encode_pdata(1, true, b"abcd", 0);
        let pdvs: Vec<_> = split_pdvs(&pdu[6..]).unwrap().collect();
        assert_eq!(pdvs.len(), 1);
        assert!(pdvs[0].is_command() && pdvs[0].is_last());
        assert_eq!(pdvs[0].data, b"abcd");
        assert!(split_pdvs(&pdu[6..9]).is_err());
        let mut lying = pdu[6..].to_vec();
        lying[0] = 0x7F;
        assert!(split_pdvs(&lying).is_err());
    }

    #[test]
    fn many_empty_pdvs_are_split_in_place() {
        // found by the pdata fuzz target: a vector of PDVs was several times the body
        let mut body = Vec::new();
        while body.len() + 6 <= 16384 {
            body.extend_from_slice(&[0, 0, 0, 2, 1, 0]);
        }
        let range = body.as_ptr_range();
        let mut n = 0;
        for pdv in split_pdvs(&body).unwrap() {
            let at = pdv.data.as_ptr();
            assert!(pdv.data.is_empty() && range.start <= at && at <= range.end);
            n += 1;
        }
        assert_eq!(n, body.len() / 6);
        body.push(0);
        assert!(split_pdvs(&body).is_err());
    }

    #[test]
    fn pdata_fragments_respect_the_peer_maximum() {
        let data = vec![7u8; 100];
        let out = encode_pdata(3, false, &data, 30);
        let mut pos = 0;
        let mut total = 0;
        let mut last = false;
        while pos < out.len() {
            let (kind, len) = parse_header(out[pos..pos + 6].try_into().unwrap());
            assert_eq!(kind, P_DATA_TF);
            assert!(len <= 30);
            let pdvs: Vec<_> = split_pdvs(&out[pos + 6..pos + 6 + len as usize])
                .unwrap()
                .collect();
            total += pdvs[0].data.len();
            last = pdvs[0].is_last();
            pos += 6 + len as usize;
        }
        assert_eq!(total, 100);
        assert!(last);
    }

    #[test]
    fn associate_rq_round_trips_and_ac_parses() {
        let body = rq_body(
            &[(1, "1.2.840.10008.1.1", &["1.2.840.10008.1.2"])],
            &[("1.2.3", true, true)],
        );
        let rq = parse_associate_rq(&body).unwrap();
        let encoded = encode_associate_rq(&rq);
        assert_eq!(&encoded[6..], &body[..]);
        let results = [ContextResult {
            id: 1,
            result: 0,
            transfer_syntax: "1.2.840.10008.1.2".into(),
        }];
        let roles = [RoleSelection {
            sop_class: "1.2.3".into(),
            scu: false,
            scp: true,
        }];
        let ac = encode_associate_ac(&AssociateAc {
            rq: &rq,
            contexts: &results,
            roles: &roles,
            max_pdu: 4096,
            implementation_class_uid: "1.2.3.4",
            implementation_version: "V1",
        });
        let parsed = parse_associate_ac(&ac[6..]).unwrap();
        assert_eq!(parsed.contexts, results.to_vec());
        assert_eq!(parsed.roles, roles.to_vec());
        assert_eq!(parsed.max_pdu, 4096);
        assert_eq!(parsed.application_context, APPLICATION_CONTEXT);
        assert_eq!(parsed.implementation_class_uid, "1.2.3.4");
        assert_eq!(parsed.implementation_version, "V1");
        assert!(parse_associate_ac(&ac[6..60]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn associate_rq_parser_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse_associate_rq(&body);
        }

        #[test]
        fn mutated_requests_never_panic(pos in 0usize..200, byte in proptest::num::u8::ANY) {
            let mut body = rq_body(&[(1, "1.2.840.10008.1.1", &["1.2.840.10008.1.2"])], &[("1.2.3", true, true)]);
            let at = pos % body.len();
            body[at] = byte;
            let _ = parse_associate_rq(&body);
        }

        #[test]
        fn associate_ac_parser_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse_associate_ac(&body);
        }

        #[test]
        fn pdv_splitter_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            if let Ok(pdvs) = split_pdvs(&body) {
                let total: usize = pdvs.map(|p| p.data.len() + 6).sum();
                proptest::prop_assert_eq!(total, body.len());
            }
        }
    }
}
