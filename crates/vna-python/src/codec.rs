//! The binding of vna-codec: greyscale pixel coding for `dicom-px2` and `dicom-px3` frames, GIL released.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use vna_codec::{Error, Geometry};

fn geometry(rows: usize, cols: usize, frames: usize, bits: u32, signed: bool) -> Geometry {
    Geometry {
        rows,
        cols,
        frames,
        bits,
        signed,
    }
}

fn py_err(e: Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// One of vna-codec's coders: (input, geometry, threads) -> output.
type Coder = fn(&[u8], &Geometry, usize) -> Result<Vec<u8>, Error>;

/// Run one of vna-codec's coders on ``data`` with the GIL released.
fn code<'py>(
    py: Python<'py>,
    data: &[u8],
    g: &Geometry,
    threads: usize,
    coder: Coder,
) -> PyResult<Bound<'py, PyBytes>> {
    let out = py.detach(|| coder(data, g, threads)).map_err(py_err)?;
    Ok(PyBytes::new(py, &out))
}

/// Code little-endian greyscale samples (frames in parallel on up to ``threads`` threads).
#[pyfunction]
#[pyo3(signature = (pixels, *, rows, cols, frames, bits, signed, threads=1))]
#[allow(clippy::too_many_arguments)]
fn gray_encode<'py>(
    py: Python<'py>,
    pixels: &[u8],
    rows: usize,
    cols: usize,
    frames: usize,
    bits: u32,
    signed: bool,
    threads: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let g = geometry(rows, cols, frames, bits, signed);
    code(py, pixels, &g, threads, vna_codec::encode)
}

/// Restore what ``gray_encode`` coded; raises ValueError if the stream is damaged.
#[pyfunction]
#[pyo3(signature = (stream, *, rows, cols, frames, bits, signed, threads=1))]
#[allow(clippy::too_many_arguments)]
fn gray_decode<'py>(
    py: Python<'py>,
    stream: &[u8],
    rows: usize,
    cols: usize,
    frames: usize,
    bits: u32,
    signed: bool,
    threads: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let g = geometry(rows, cols, frames, bits, signed);
    code(py, stream, &g, threads, vna_codec::decode)
}

/// Code little-endian greyscale samples as a ``px3`` stream (static-model rANS; frames in parallel).
#[pyfunction]
#[pyo3(signature = (pixels, *, rows, cols, frames, bits, signed, threads=1))]
#[allow(clippy::too_many_arguments)]
fn gray3_encode<'py>(
    py: Python<'py>,
    pixels: &[u8],
    rows: usize,
    cols: usize,
    frames: usize,
    bits: u32,
    signed: bool,
    threads: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let g = geometry(rows, cols, frames, bits, signed);
    code(py, pixels, &g, threads, vna_codec::encode_px3)
}

/// Restore what ``gray3_encode`` coded; raises ValueError if the stream is damaged.
#[pyfunction]
#[pyo3(signature = (stream, *, rows, cols, frames, bits, signed, threads=1))]
#[allow(clippy::too_many_arguments)]
fn gray3_decode<'py>(
    py: Python<'py>,
    stream: &[u8],
    rows: usize,
    cols: usize,
    frames: usize,
    bits: u32,
    signed: bool,
    threads: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let g = geometry(rows, cols, frames, bits, signed);
    code(py, stream, &g, threads, vna_codec::decode_px3)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(gray_encode, m)?)?;
    m.add_function(wrap_pyfunction!(gray_decode, m)?)?;
    m.add_function(wrap_pyfunction!(gray3_encode, m)?)?;
    m.add_function(wrap_pyfunction!(gray3_decode, m)?)?;
    Ok(())
}
