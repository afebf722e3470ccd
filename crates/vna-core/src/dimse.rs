//! DIMSE command sets (PS3.7 E, group 0000, Implicit VR Little Endian) and the
//! Part 10 header vna writes at the head of a spooled C-STORE data set.

use crate::pdu::PduError;

pub const C_STORE_RQ: u16 = 0x0001;
pub const C_STORE_RSP: u16 = 0x8001;
pub const C_ECHO_RQ: u16 = 0x0030;
pub const C_ECHO_RSP: u16 = 0x8030;
pub const C_FIND_RQ: u16 = 0x0020;
pub const C_FIND_RSP: u16 = 0x8020;
pub const C_GET_RQ: u16 = 0x0010;
pub const C_GET_RSP: u16 = 0x8010;
pub const C_MOVE_RQ: u16 = 0x0021;
pub const C_MOVE_RSP: u16 = 0x8021;
pub const C_CANCEL_RQ: u16 = 0x0FFF;
pub const N_ACTION_RQ: u16 = 0x0130;
pub const N_ACTION_RSP: u16 = 0x8130;
pub const NO_DATASET: u16 = 0x0101;
/// CommandDataSetType of a command followed by a data set, as pynetdicom writes it.
pub const WITH_DATASET: u16 = 0x0001;

/// The elements of a request command set that the receiver uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Command {
    pub command_field: u16,
    pub message_id: u16,
    pub affected_sop_class: String,
    pub affected_sop_instance: String,
    pub priority: u16,
    /// CommandDataSetType: 0x0101 when no data set follows.
    pub data_set_type: u16,
    pub move_originator_ae: Option<String>,
    pub move_originator_id: Option<u16>,
    /// RequestedSOPClassUID (0000,0003) of an N- request.
    pub requested_sop_class: String,
    /// RequestedSOPInstanceUID (0000,1001) of an N- request.
    pub requested_sop_instance: String,
    /// MoveDestination (0000,0600) of a C-MOVE-RQ.
    pub move_destination: Option<String>,
    /// MessageIDBeingRespondedTo (0000,0120) of a response or a C-CANCEL-RQ.
    pub responded_to: Option<u16>,
    /// ActionTypeID (0000,1008) of an N-ACTION.
    pub action_type_id: Option<u16>,
    /// Status (0000,0900) of a response.
    pub status: Option<u16>,
    /// The elements (0000,eeee) present.
    pub present: Vec<u16>,
}

impl Command {
    /// The elements a C-STORE-RQ cannot go without (PS3.7 9.3.1.1) that this one lacks or has empty,
    /// as "Keyword (0000,eeee)" (the Python receiver's rule: Priority may be absent).
    pub fn missing_for_store(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.present.contains(&0x0110) {
            out.push("MessageID (0000,0110)");
        }
        if self.affected_sop_class.is_empty() {
            out.push("AffectedSOPClassUID (0000,0002)");
        }
        if self.affected_sop_instance.is_empty() {
            out.push("AffectedSOPInstanceUID (0000,1000)");
        }
        out
    }

    /// True when a data set follows the command.
    pub fn has_data_set(&self) -> bool {
        self.data_set_type != NO_DATASET
    }
}

fn us(value: &[u8]) -> Result<u16, PduError> {
    match value {
        [a, b] => Ok(u16::from_le_bytes([*a, *b])),
        _ => Err(PduError(
            "US element of a command set is not 2 bytes".into(),
        )),
    }
}

fn text(value: &[u8]) -> Result<String, PduError> {
    if !value.is_ascii() {
        return Err(PduError("non-ASCII text in a command set".into()));
    }
    Ok(std::str::from_utf8(value)
        .unwrap_or_default()
        .trim_matches(['\0', ' '])
        .to_string())
}

/// Decode a request command set; unknown elements are skipped, lengths are checked.
pub fn parse_command(raw: &[u8]) -> Result<Command, PduError> {
    let mut cmd = Command::default();
    let mut has_field = false;
    let mut has_type = false;
    let mut pos = 0usize;
    while pos < raw.len() {
        if raw.len() - pos < 8 {
            return Err(PduError("truncated command element".into()));
        }
        let group = u16::from_le_bytes([raw[pos], raw[pos + 1]]);
        let elem = u16::from_le_bytes([raw[pos + 2], raw[pos + 3]]);
        let len =
            u32::from_le_bytes([raw[pos + 4], raw[pos + 5], raw[pos + 6], raw[pos + 7]]) as usize;
        pos += 8;
        if group != 0 || len > raw.len() - pos {
            return Err(PduError(
                "command element outside group 0000 or longer than its set".into(),
            ));
        }
        let value = &raw[pos..pos + len];
        pos += len;
        if cmd.present.len() < 64 {
            cmd.present.push(elem);
        }
        match elem {
            0x0002 => cmd.affected_sop_class = text(value)?,
            0x0100 => {
                cmd.command_field = us(value)?;
                has_field = true;
            }
            0x0003 => cmd.requested_sop_class = text(value)?,
            0x0110 => cmd.message_id = us(value)?,
            0x0120 => cmd.responded_to = Some(us(value)?),
            0x0600 => cmd.move_destination = Some(text(value)?),
            0x0900 => cmd.status = Some(us(value)?),
            0x1001 => cmd.requested_sop_instance = text(value)?,
            0x1008 => cmd.action_type_id = Some(us(value)?),
            0x0700 => cmd.priority = us(value)?,
            0x0800 => {
                cmd.data_set_type = us(value)?;
                has_type = true;
            }
            0x1000 => cmd.affected_sop_instance = text(value)?,
            0x1030 => cmd.move_originator_ae = Some(text(value)?).filter(|s| !s.is_empty()),
            0x1031 => cmd.move_originator_id = Some(us(value)?),
            _ => {}
        }
    }
    if !has_field {
        return Err(PduError(
            "a command set without CommandField (0000,0100)".into(),
        ));
    }
    if !has_type {
        return Err(PduError(
            "a command set without CommandDataSetType (0000,0800)".into(),
        ));
    }
    Ok(cmd)
}

/// True for a well-formed UID (PS3.5 9.1): 1-64 characters, digit components without leading zeros.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

fn padded(value: &str, pad: u8) -> Vec<u8> {
    let mut raw = value.as_bytes().to_vec();
    if raw.len() % 2 == 1 {
        raw.push(pad);
    }
    raw
}

fn element(out: &mut Vec<u8>, elem: u16, value: &[u8]) {
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

fn with_group_length(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 12);
    element(&mut out, 0x0000, &(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// A C-STORE-RSP command set, byte for byte as pynetdicom encodes it.
pub fn encode_store_rsp(
    message_id: u16,
    sop_class: &str,
    sop_instance: &str,
    status: u16,
    comment: Option<&str>,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(160);
    element(&mut body, 0x0002, &padded(sop_class, 0));
    element(&mut body, 0x0100, &C_STORE_RSP.to_le_bytes());
    element(&mut body, 0x0120, &message_id.to_le_bytes());
    element(&mut body, 0x0800, &NO_DATASET.to_le_bytes());
    element(&mut body, 0x0900, &status.to_le_bytes());
    if let Some(comment) = comment.filter(|c| !c.is_empty()) {
        element(&mut body, 0x0902, &padded(comment, b' '));
    }
    element(&mut body, 0x1000, &padded(sop_instance, 0));
    with_group_length(body)
}

/// A C-ECHO-RSP command set with status Success, as pynetdicom encodes it.
pub fn encode_echo_rsp(message_id: u16, sop_class: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    element(&mut body, 0x0002, &padded(sop_class, 0));
    element(&mut body, 0x0100, &C_ECHO_RSP.to_le_bytes());
    element(&mut body, 0x0120, &message_id.to_le_bytes());
    element(&mut body, 0x0800, &NO_DATASET.to_le_bytes());
    element(&mut body, 0x0900, &0u16.to_le_bytes());
    with_group_length(body)
}

/// Sub-operation counts of a C-GET/C-MOVE response: remaining (None: left out), completed, failed, warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub remaining: Option<u16>,
    pub completed: u16,
    pub failed: u16,
    pub warning: u16,
}

/// A C-FIND-RSP command set, as pynetdicom encodes it; `identifier`: a data set follows.
pub fn encode_find_rsp(message_id: u16, sop_class: &str, status: u16, identifier: bool) -> Vec<u8> {
    let mut body = Vec::with_capacity(96);
    element(&mut body, 0x0002, &padded(sop_class, 0));
    element(&mut body, 0x0100, &C_FIND_RSP.to_le_bytes());
    element(&mut body, 0x0120, &message_id.to_le_bytes());
    let kind = if identifier { WITH_DATASET } else { NO_DATASET };
    element(&mut body, 0x0800, &kind.to_le_bytes());
    element(&mut body, 0x0900, &status.to_le_bytes());
    with_group_length(body)
}

/// A C-GET-RSP or C-MOVE-RSP (`command_field`) command set, as pynetdicom encodes it.
pub fn encode_retrieve_rsp(
    command_field: u16,
    message_id: u16,
    sop_class: &str,
    status: u16,
    counts: Option<Counts>,
    identifier: bool,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(128);
    element(&mut body, 0x0002, &padded(sop_class, 0));
    element(&mut body, 0x0100, &command_field.to_le_bytes());
    element(&mut body, 0x0120, &message_id.to_le_bytes());
    let kind = if identifier { WITH_DATASET } else { NO_DATASET };
    element(&mut body, 0x0800, &kind.to_le_bytes());
    element(&mut body, 0x0900, &status.to_le_bytes());
    if let Some(c) = counts {
        if let Some(remaining) = c.remaining {
            element(&mut body, 0x1020, &remaining.to_le_bytes());
        }
        element(&mut body, 0x1021, &c.completed.to_le_bytes());
        element(&mut body, 0x1022, &c.failed.to_le_bytes());
        element(&mut body, 0x1023, &c.warning.to_le_bytes());
    }
    with_group_length(body)
}

/// An N-ACTION-RSP command set, as pynetdicom encodes it; `reply`: an Action Reply follows.
pub fn encode_action_rsp(
    message_id: u16,
    sop_class: &str,
    sop_instance: &str,
    action_type_id: Option<u16>,
    status: u16,
    reply: bool,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(128);
    element(&mut body, 0x0002, &padded(sop_class, 0));
    element(&mut body, 0x0100, &N_ACTION_RSP.to_le_bytes());
    element(&mut body, 0x0120, &message_id.to_le_bytes());
    let kind = if reply { WITH_DATASET } else { NO_DATASET };
    element(&mut body, 0x0800, &kind.to_le_bytes());
    element(&mut body, 0x0900, &status.to_le_bytes());
    element(&mut body, 0x1000, &padded(sop_instance, 0));
    if let Some(id) = action_type_id {
        element(&mut body, 0x1008, &id.to_le_bytes());
    }
    with_group_length(body)
}

fn meta_ui(out: &mut Vec<u8>, elem: u16, vr: &[u8; 2], value: &str, pad: u8) {
    let raw = padded(value, pad);
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    out.extend_from_slice(&(raw.len() as u16).to_le_bytes());
    out.extend_from_slice(&raw);
}

/// Preamble, "DICM" and the File Meta group of a spooled data set, byte for byte as
/// pydicom writes it for pynetdicom's chunked C-STORE receive.
///
/// The values must be non-empty ASCII of at most 64 characters (checked by the caller).
pub fn spool_header(
    sop_class: &str,
    sop_instance: &str,
    transfer_syntax: &str,
    implementation_uid: &str,
    implementation_version: &str,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(&2u16.to_le_bytes());
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(b"OB\0\0");
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&[0, 1]);
    meta_ui(&mut body, 0x0002, b"UI", sop_class, 0);
    meta_ui(&mut body, 0x0003, b"UI", sop_instance, 0);
    meta_ui(&mut body, 0x0010, b"UI", transfer_syntax, 0);
    meta_ui(&mut body, 0x0012, b"UI", implementation_uid, 0);
    meta_ui(&mut body, 0x0013, b"SH", implementation_version, b' ');
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(b"UL");
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_rq() -> Vec<u8> {
        let mut body = Vec::new();
        element(&mut body, 0x0002, &padded("1.2.840.10008.5.1.4.1.1.2", 0));
        element(&mut body, 0x0100, &C_STORE_RQ.to_le_bytes());
        element(&mut body, 0x0110, &7u16.to_le_bytes());
        element(&mut body, 0x0700, &2u16.to_le_bytes());
        element(&mut body, 0x0800, &0u16.to_le_bytes());
        element(&mut body, 0x1000, &padded("1.2.3.45", 0));
        with_group_length(body)
    }

    #[test]
    fn parses_a_store_request() {
        let cmd = parse_command(&store_rq()).unwrap();
        assert_eq!(cmd.command_field, C_STORE_RQ);
        assert_eq!(cmd.message_id, 7);
        assert_eq!(cmd.affected_sop_class, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(cmd.affected_sop_instance, "1.2.3.45");
        assert!(cmd.has_data_set());
    }

    #[test]
    fn store_rsp_has_group_length() {
        let rsp = encode_store_rsp(7, "1.2.3", "1.2.3.4", 0xA700, Some("disk full"));
        let len = u32::from_le_bytes(rsp[8..12].try_into().unwrap()) as usize;
        assert_eq!(len, rsp.len() - 12);
        let cmd = parse_command(&rsp).unwrap();
        assert_eq!(cmd.command_field, C_STORE_RSP);
    }

    #[test]
    fn retrieve_rsp_counts() {
        let counts = Counts {
            remaining: Some(3),
            completed: 1,
            failed: 2,
            warning: 0,
        };
        let rsp = encode_retrieve_rsp(C_GET_RSP, 4, "1.2.3", 0xFF00, Some(counts), false);
        let cmd = parse_command(&rsp).unwrap();
        assert_eq!(cmd.command_field, C_GET_RSP);
        assert_eq!(cmd.responded_to, Some(4));
        assert_eq!(cmd.status, Some(0xFF00));
        assert!(cmd.present.contains(&0x1020) && cmd.present.contains(&0x1023));
        let rsp = encode_find_rsp(4, "1.2.3", 0xFF00, true);
        assert!(parse_command(&rsp).unwrap().has_data_set());
        let rsp = encode_action_rsp(
            4,
            "1.2.840.10008.1.20.1",
            "1.2.840.10008.1.20.1.1",
            Some(1),
            0,
            false,
        );
        let cmd = parse_command(&rsp).unwrap();
        assert_eq!(
            (cmd.command_field, cmd.action_type_id),
            (N_ACTION_RSP, Some(1))
        );
    }

    #[test]
    fn uids() {
        assert!(valid_uid("1.2.840.10008.1.1"));
        assert!(valid_uid("1.0.3"));
        assert!(!valid_uid("1.02.3"));
        assert!(!valid_uid("1..3"));
        assert!(!valid_uid(""));
        assert!(!valid_uid("1.2.a"));
    }

    proptest::proptest! {
        #[test]
        fn command_parser_never_panics(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_command(&raw);
        }

        #[test]
        fn lying_lengths_are_refused(pos in 0usize..120, byte in proptest::num::u8::ANY) {
            let mut raw = store_rq();
            let at = pos % raw.len();
            raw[at] = byte;
            let _ = parse_command(&raw);
        }
    }
}
