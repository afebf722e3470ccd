//! Presentation context negotiation as an acceptor, with pynetdicom's rules:
//! the first of *our* transfer syntaxes that the requestor proposed is accepted;
//! an SCP/SCU Role Selection proposal is answered for contexts that declare roles.
//! With [`UnknownStorage`], a proposed abstract syntax we do not support by name is
//! negotiated as a storage class (`dicom.accept_unknown_storage_classes`).

use std::collections::{HashMap, HashSet};

use crate::pdu::{AssociateRq, ContextResult, RoleSelection};

/// An abstract syntax the acceptor supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupportedContext {
    /// Our transfer syntaxes, in order of preference.
    pub transfer_syntaxes: Vec<String>,
    /// (requestor may be SCU, requestor may be SCP); None: default roles, no role reply.
    pub roles: Option<(bool, bool)>,
    /// True for a storage SOP class (C-STORE receive), false for Verification.
    pub storage: bool,
}

/// Storage SOP classes accepted without being named: any proposed abstract syntax that is a valid
/// UID, not supported by name and not in `refused` (SOP classes of other services, which never become
/// storage) is negotiated with `context` (its transfer syntaxes and roles; `storage` should be true).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownStorage {
    pub context: SupportedContext,
    pub refused: HashSet<String>,
}

impl UnknownStorage {
    /// True when `uid` is accepted as an unknown storage class (`uid` not supported by name).
    pub fn accepts(&self, uid: &str) -> bool {
        valid_uid(uid) && !self.refused.contains(uid)
    }
}

/// A valid UID as pydicom's `UID.is_valid` has it: at most 64 characters, dot-separated
/// numeric components without leading zeros.
pub fn valid_uid(uid: &str) -> bool {
    uid.len() <= 64
        && uid.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

/// An accepted presentation context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub abstract_syntax: String,
    pub transfer_syntax: String,
    pub storage: bool,
    /// True when we act as SCP on it (the requestor sends requests).
    pub as_scp: bool,
    /// True when we act as SCU on it (C-STORE sub-operations of a C-GET go to the requestor).
    pub as_scu: bool,
}

/// The negotiation's outcome: results for the A-ASSOCIATE-AC, role replies, accepted contexts by ID.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub results: Vec<ContextResult>,
    pub roles: Vec<RoleSelection>,
    pub accepted: HashMap<u8, Accepted>,
}

/// Negotiate the proposed contexts of `rq` against `supported` (keyed by abstract syntax), and
/// the other abstract syntaxes against `unknown` when given.
pub fn negotiate(
    rq: &AssociateRq,
    supported: &HashMap<String, SupportedContext>,
    unknown: Option<&UnknownStorage>,
) -> Outcome {
    let mut out = Outcome::default();
    let proposed_roles: HashMap<&str, (bool, bool)> = rq
        .roles
        .iter()
        .map(|r| (r.sop_class.as_str(), (r.scu, r.scp)))
        .collect();
    let mut replied: HashMap<String, RoleSelection> = HashMap::new();
    for cx in &rq.contexts {
        let first = cx.transfer_syntaxes.first().cloned().unwrap_or_default();
        let ours = supported.get(&cx.abstract_syntax).or_else(|| {
            unknown
                .filter(|u| u.accepts(&cx.abstract_syntax))
                .map(|u| &u.context)
        });
        let Some(ours) = ours else {
            out.results.push(ContextResult {
                id: cx.id,
                result: 3,
                transfer_syntax: first,
            });
            continue;
        };
        let Some(ts) = ours
            .transfer_syntaxes
            .iter()
            .find(|ts| cx.transfer_syntaxes.iter().any(|p| p == *ts))
        else {
            out.results.push(ContextResult {
                id: cx.id,
                result: 4,
                transfer_syntax: first,
            });
            continue;
        };
        let (as_scp, as_scu) = match (ours.roles, proposed_roles.get(cx.abstract_syntax.as_str())) {
            (Some((may_scu, may_scp)), Some(&(rq_scu, rq_scp))) => {
                let reply = RoleSelection {
                    sop_class: cx.abstract_syntax.clone(),
                    scu: rq_scu && may_scu,
                    scp: rq_scp && may_scp,
                };
                let roles = (reply.scu, reply.scp);
                replied.insert(cx.abstract_syntax.clone(), reply);
                roles
            }
            _ => (true, false),
        };
        if !as_scp && !as_scu {
            out.results.push(ContextResult {
                id: cx.id,
                result: 1,
                transfer_syntax: ts.clone(),
            });
            continue;
        }
        out.results.push(ContextResult {
            id: cx.id,
            result: 0,
            transfer_syntax: ts.clone(),
        });
        out.accepted.insert(
            cx.id,
            Accepted {
                abstract_syntax: cx.abstract_syntax.clone(),
                transfer_syntax: ts.clone(),
                storage: ours.storage,
                as_scp,
                as_scu,
            },
        );
    }
    out.results.sort_by_key(|r| r.id);
    let mut roles: Vec<RoleSelection> = replied.into_values().collect();
    roles.sort_by(|a, b| a.sop_class.cmp(&b.sop_class));
    out.roles = roles;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::ProposedContext;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const EXPLICIT: &str = "1.2.840.10008.1.2.1";
    const IMPLICIT: &str = "1.2.840.10008.1.2";

    fn supported() -> HashMap<String, SupportedContext> {
        let mut m = HashMap::new();
        m.insert(
            CT.to_string(),
            SupportedContext {
                transfer_syntaxes: vec![EXPLICIT.into(), IMPLICIT.into()],
                roles: Some((true, true)),
                storage: true,
            },
        );
        m
    }

    fn rq(contexts: Vec<ProposedContext>, roles: Vec<RoleSelection>) -> AssociateRq {
        AssociateRq {
            contexts,
            roles,
            ..AssociateRq::default()
        }
    }

    #[test]
    fn our_preference_wins() {
        let r = rq(
            vec![ProposedContext {
                id: 1,
                abstract_syntax: CT.into(),
                transfer_syntaxes: vec![IMPLICIT.into(), EXPLICIT.into()],
            }],
            vec![],
        );
        let out = negotiate(&r, &supported(), None);
        assert_eq!(out.results[0].result, 0);
        assert_eq!(out.results[0].transfer_syntax, EXPLICIT);
        assert!(out.accepted[&1].as_scp);
        assert!(out.roles.is_empty());
    }

    #[test]
    fn unsupported_abstract_and_transfer_syntaxes() {
        let r = rq(
            vec![
                ProposedContext {
                    id: 1,
                    abstract_syntax: "1.2.840.10008.5.1.4.1.2.2.1".into(),
                    transfer_syntaxes: vec![IMPLICIT.into()],
                },
                ProposedContext {
                    id: 3,
                    abstract_syntax: CT.into(),
                    transfer_syntaxes: vec!["1.2.3".into()],
                },
            ],
            vec![],
        );
        let out = negotiate(&r, &supported(), None);
        assert_eq!(
            out.results.iter().map(|r| r.result).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert!(out.accepted.is_empty());
    }

    #[test]
    fn role_selection_is_answered() {
        let r = rq(
            vec![ProposedContext {
                id: 1,
                abstract_syntax: CT.into(),
                transfer_syntaxes: vec![IMPLICIT.into()],
            }],
            vec![RoleSelection {
                sop_class: CT.into(),
                scu: false,
                scp: true,
            }],
        );
        let out = negotiate(&r, &supported(), None);
        assert_eq!(out.roles.len(), 1);
        assert!(!out.accepted[&1].as_scp);
        assert!(out.accepted[&1].as_scu);
    }

    #[test]
    fn unknown_classes_are_storage_when_asked() {
        const PRIVATE: &str = "1.2.3.4.5.6.7";
        const WORKLIST: &str = "1.2.840.10008.5.1.4.31";
        let unknown = UnknownStorage {
            context: SupportedContext {
                transfer_syntaxes: vec![EXPLICIT.into(), IMPLICIT.into()],
                roles: Some((true, true)),
                storage: true,
            },
            refused: [WORKLIST.to_string()].into_iter().collect(),
        };
        let proposed = |id: u8, uid: &str| ProposedContext {
            id,
            abstract_syntax: uid.into(),
            transfer_syntaxes: vec![IMPLICIT.into()],
        };
        let r = rq(
            vec![
                proposed(1, PRIVATE),
                proposed(3, WORKLIST),
                proposed(5, "1.2.03.4"),
                proposed(7, CT),
            ],
            vec![RoleSelection {
                sop_class: PRIVATE.into(),
                scu: true,
                scp: true,
            }],
        );
        let results = |out: &Outcome| out.results.iter().map(|r| r.result).collect::<Vec<_>>();
        // refused by default
        let out = negotiate(&r, &supported(), None);
        assert_eq!(results(&out), vec![3, 3, 3, 0]);
        // accepted as storage, with its roles answered (C-GET sub-operations may go back on it)
        let out = negotiate(&r, &supported(), Some(&unknown));
        assert_eq!(results(&out), vec![0, 3, 3, 0]);
        let private = &out.accepted[&1];
        assert!(private.storage && private.as_scp && private.as_scu);
        assert_eq!(private.transfer_syntax, IMPLICIT);
        assert_eq!(out.roles.len(), 1);
        assert!(out.roles[0].scu && out.roles[0].scp);
    }

    #[test]
    fn uid_validity() {
        for ok in ["1.2.3", "0.1", "1.2.840.10008.5.1.4.1.1.501.1"] {
            assert!(valid_uid(ok), "{ok}");
        }
        let long = "1.".repeat(32) + "1";
        for bad in ["", "1..2", "1.02", "1.2.", "1.a", " 1.2", long.as_str()] {
            assert!(!valid_uid(bad), "{bad}");
        }
    }
}
