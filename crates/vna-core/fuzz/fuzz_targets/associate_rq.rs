//! The A-ASSOCIATE-RQ parser (a PDU body as the listener read it), then, for a request it
//! accepts, presentation context negotiation and the A-ASSOCIATE-AC it answers with.
//! Properties: no panic; an accepted request re-encodes to itself; negotiation answers every
//! proposed context once, accepts only what was proposed and supported (by name, or as an
//! unknown storage class when those are accepted); the AC parses back
//! to the negotiated results; no single allocation beyond a constant factor of the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vna_core::negotiate::negotiate;
use vna_core::pdu;
use vna_core_fuzz::{bounded, parser_bound, supported, unknown_storage};

fuzz_target!(|body: &[u8]| {
    let supported = supported();
    let unknown = unknown_storage();
    bounded(parser_bound(body.len(), 16), || {
        let Ok(rq) = pdu::parse_associate_rq(body) else {
            return;
        };
        let again = pdu::encode_associate_rq(&rq);
        assert_eq!(pdu::parse_associate_rq(&again[6..]), Ok(rq.clone()));

        for unknown in [None, Some(&unknown)] {
            let outcome = negotiate(&rq, &supported, unknown);
            assert_eq!(outcome.results.len(), rq.contexts.len());
            for (id, acc) in &outcome.accepted {
                let proposed: Vec<_> = rq.contexts.iter().filter(|c| c.id == *id).collect();
                assert!(
                    !proposed.is_empty(),
                    "accepted context {id} was not proposed"
                );
                assert!(proposed
                    .iter()
                    .any(|c| c.abstract_syntax == acc.abstract_syntax
                        && c.transfer_syntaxes.contains(&acc.transfer_syntax)));
                let ours = match supported.get(&acc.abstract_syntax) {
                    Some(ours) => ours,
                    None => {
                        let u = unknown.expect("an unnamed class is accepted only as unknown");
                        assert!(u.accepts(&acc.abstract_syntax));
                        &u.context
                    }
                };
                assert!(ours.transfer_syntaxes.contains(&acc.transfer_syntax));
            }
            for r in &outcome.results {
                assert!(r.result <= 4);
            }
            let ac = pdu::encode_associate_ac(&pdu::AssociateAc {
                rq: &rq,
                contexts: &outcome.results,
                roles: &outcome.roles,
                max_pdu: 16384,
                implementation_class_uid: "1.2.826.0.1.3680043.9.7433.1",
                implementation_version: "VNA_FUZZ",
            });
            let parsed = pdu::parse_associate_ac(&ac[6..]).expect("our own A-ASSOCIATE-AC parses");
            assert_eq!(parsed.contexts, outcome.results);
            assert_eq!(parsed.roles, outcome.roles);
            assert_eq!(parsed.max_pdu, 16384);
        }
    });
});
