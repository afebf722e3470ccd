//! The binding of vna-core's Part 10 header scanner (`vna_core::part10`), the scan with the GIL
//! released.

use std::collections::HashMap;
use std::path::PathBuf;

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use vna_core::part10::{self, DictEntry};

/// One wanted element: (tag, VR or None, length, value bytes, value offset).
type PyElement = (u32, Option<String>, u32, Py<PyBytes>, u64);
/// (transfer syntax UID, its raw value, its offset, implicit VR, wanted elements found).
type PyHeader = (String, Py<PyBytes>, u64, bool, Vec<PyElement>);

/// The Part 10 header scanner for one set of wanted tags and pydicom's data dictionary.
#[pyclass(frozen, module = "vna_native")]
struct Part10Scanner {
    wanted: HashMap<u32, String>,
    /// Every tag of the main dictionary: whether its VR is SQ.
    tags: HashMap<u32, bool>,
    /// The repeater masks in pydicom's order: (mask1, mask2, VR is SQ).
    repeaters: Vec<(u32, u32, bool)>,
}

impl Part10Scanner {
    /// pydicom's `dictionary_VR(tag) == "SQ"`, with `KeyError` as [`DictEntry::Unknown`].
    fn entry(&self, tag: u32) -> DictEntry {
        let kind = |sq: bool| {
            if sq {
                DictEntry::Sequence
            } else {
                DictEntry::Other
            }
        };
        if let Some(&sq) = self.tags.get(&tag) {
            return kind(sq);
        }
        if (tag >> 16) % 2 == 1 {
            return DictEntry::Unknown; // private: no repeater lookup
        }
        self.repeaters
            .iter()
            .find(|(m1, m2, _)| (tag ^ m1) & m2 == 0)
            .map_or(DictEntry::Unknown, |&(_, _, sq)| kind(sq))
    }
}

#[pymethods]
impl Part10Scanner {
    #[new]
    fn new(
        wanted: HashMap<u32, String>,
        tags: HashMap<u32, bool>,
        repeaters: Vec<(u32, u32, bool)>,
    ) -> Self {
        Part10Scanner {
            wanted,
            tags,
            repeaters,
        }
    }

    /// Scans the file at ``path``; None where the Python scanner declines. Raises OSError.
    fn scan(
        &self,
        py: Python<'_>,
        path: PathBuf,
        private_ts: Vec<String>,
    ) -> PyResult<Option<PyHeader>> {
        let found = py
            .detach(|| part10::scan_part10(&path, &self.wanted, &|t| self.entry(t), &private_ts))
            .map_err(|e| match e.raw_os_error() {
                Some(n) => PyOSError::new_err((n, e.to_string())),
                None => PyOSError::new_err(e.to_string()),
            })?;
        Ok(found.map(|h| {
            let elements = h
                .elements
                .into_iter()
                .map(|e| {
                    (
                        e.tag,
                        e.vr,
                        e.length,
                        PyBytes::new(py, &e.value).unbind(),
                        e.value_offset,
                    )
                })
                .collect();
            (
                h.transfer_syntax,
                PyBytes::new(py, &h.transfer_syntax_raw).unbind(),
                h.transfer_syntax_offset,
                h.implicit_vr,
                elements,
            )
        }))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Part10Scanner>()?;
    Ok(())
}
