//! Round trips of every shape and content, and damaged streams refused without a panic: the same cases
//! (cases/roundtrip_cases.rs) for px2 and px3.

mod px2 {
    use proptest::prelude::*;
    use vna_codec::{decode, encode, Error, Geometry};
    include!("cases/roundtrip_cases.rs");
}

mod px3 {
    use proptest::prelude::*;
    use vna_codec::{decode_px3 as decode, encode_px3 as encode, Error, Geometry};
    include!("cases/roundtrip_cases.rs");
}
