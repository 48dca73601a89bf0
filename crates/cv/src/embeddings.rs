//! The embeddings an `embed` job writes and the portal's image search imports: a declared,
//! versioned format, because the job and the portal may be different releases.
//!
//! Two files in one folder:
//! - `embeddings.json`: `{"format": "suanli.embeddings/1", "model": "<model version>", "dim": D,
//!   "items": [{"name": "<path in the input>", "sha256": "<hex of the image bytes>"}, …]}`;
//! - `embeddings.f32`: the vectors, item after item, `D` little-endian `f32` each, L2-normalised.
//!
//! The vectors are raw rather than JSON numbers because a library of 10⁵ images at 512
//! dimensions is 200 MB of floats: as text it would be three times that and slow to parse.
//! Both files are written to temporary names and renamed, the data first, so a reader that
//! finds the header finds the data it names. A later version gets a new `format` string and a
//! reader for both.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "suanli.embeddings/1";
pub const HEADER_FILE: &str = "embeddings.json";
pub const DATA_FILE: &str = "embeddings.f32";
/// The widest vector accepted (a ResNet-50's pooled features are 2,048).
pub const MAX_DIM: u32 = 8192;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedItem {
    pub name: String,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: String,
    pub model: String,
    pub dim: u32,
    pub items: Vec<EmbeddedItem>,
}

#[derive(Debug, thiserror::Error)]
pub enum EmbeddingsError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{HEADER_FILE}: {0}")]
    Header(String),
    #[error("{DATA_FILE}: {0}")]
    Data(String),
}

/// Embeddings as read back: the header and one vector per item, in the header's order.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    pub header: Header,
    pub vectors: Vec<Vec<f32>>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EmbeddingsError + '_ {
    move |source| EmbeddingsError::Io { path: path.display().to_string(), source }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), EmbeddingsError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Writes `items` with their `vectors` (same length, each `dim` long) into `dir`.
pub fn write(dir: &Path, model: &str, dim: u32, items: Vec<EmbeddedItem>, vectors: &[Vec<f32>]) -> Result<(), EmbeddingsError> {
    if items.len() != vectors.len() {
        return Err(EmbeddingsError::Data(format!("{} items but {} vectors", items.len(), vectors.len())));
    }
    let mut data = Vec::with_capacity(vectors.len() * dim as usize * 4);
    for (item, v) in items.iter().zip(vectors) {
        if v.len() != dim as usize {
            return Err(EmbeddingsError::Data(format!("{}: {} values, expected {dim}", item.name, v.len())));
        }
        data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    let header = Header { format: FORMAT.into(), model: model.into(), dim, items };
    let json = serde_json::to_vec(&header).map_err(|e| EmbeddingsError::Header(e.to_string()))?;
    write_atomically(&dir.join(DATA_FILE), &data)?;
    write_atomically(&dir.join(HEADER_FILE), &json)
}

/// Reads what [`write`] wrote, checking the format, the sizes and every value.
pub fn read(dir: &Path) -> Result<Embeddings, EmbeddingsError> {
    let path = dir.join(HEADER_FILE);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let header: Header = serde_json::from_slice(&bytes).map_err(|e| EmbeddingsError::Header(e.to_string()))?;
    if header.format != FORMAT {
        return Err(EmbeddingsError::Header(format!("format {:?}, this release reads {FORMAT:?}", header.format)));
    }
    if !(1..=MAX_DIM).contains(&header.dim) {
        return Err(EmbeddingsError::Header(format!("dim {}: between 1 and {MAX_DIM}", header.dim)));
    }
    let path = dir.join(DATA_FILE);
    let data = std::fs::read(&path).map_err(io_err(&path))?;
    let row = header.dim as usize * 4;
    if data.len() != header.items.len() * row {
        return Err(EmbeddingsError::Data(format!(
            "{} bytes, the header's {} items of {} dimensions need {}",
            data.len(),
            header.items.len(),
            header.dim,
            header.items.len() * row
        )));
    }
    let vectors: Vec<Vec<f32>> = data.chunks_exact(row).map(|r| r.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()).collect();
    if let Some(i) = vectors.iter().position(|v| v.iter().any(|x| !x.is_finite())) {
        return Err(EmbeddingsError::Data(format!("{}: a value that is not a finite number", header.items[i].name)));
    }
    Ok(Embeddings { header, vectors })
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str) -> EmbeddedItem {
        EmbeddedItem { name: name.into(), sha256: format!("{:0>64}", name.len()) }
    }

    #[test]
    fn what_is_written_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let vectors = vec![vec![0.6, 0.8], vec![1.0, 0.0]];
        write(dir.path(), "m@sha256:00", 2, vec![item("a.png"), item("b/c.jpg")], &vectors).unwrap();
        let back = read(dir.path()).unwrap();
        assert_eq!(back.vectors, vectors);
        assert_eq!(back.header.items[1].name, "b/c.jpg");
    }

    /// The bytes are the promise: a change here breaks portals importing older jobs' output.
    #[test]
    fn version_one_bytes_are_pinned() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "resnet18w32@sha256:0123456789abcdef", 2, vec![item("a.png")], &[vec![0.6, 0.8]]).unwrap();
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/embeddings-v1");
        assert_eq!(std::fs::read(dir.path().join(HEADER_FILE)).unwrap(), std::fs::read(golden.join(HEADER_FILE)).unwrap());
        assert_eq!(std::fs::read(dir.path().join(DATA_FILE)).unwrap(), std::fs::read(golden.join(DATA_FILE)).unwrap());
        assert_eq!(read(&golden).unwrap().vectors, vec![vec![0.6, 0.8]]);
    }

    #[test]
    fn a_short_data_file_is_refused_with_the_sizes() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "m", 2, vec![item("a"), item("b")], &[vec![0.6, 0.8], vec![1.0, 0.0]]).unwrap();
        let data = std::fs::read(dir.path().join(DATA_FILE)).unwrap();
        std::fs::write(dir.path().join(DATA_FILE), &data[..12]).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("12 bytes") && err.contains("need 16"), "{err}");
    }

    #[test]
    fn another_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "m", 2, vec![item("a")], &[vec![0.6, 0.8]]).unwrap();
        let header = std::fs::read_to_string(dir.path().join(HEADER_FILE)).unwrap().replace("embeddings/1", "embeddings/2");
        std::fs::write(dir.path().join(HEADER_FILE), header).unwrap();
        assert!(read(dir.path()).unwrap_err().to_string().contains("suanli.embeddings/2"));
    }

    #[test]
    fn nan_in_the_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "m", 2, vec![item("a")], &[vec![f32::NAN, 0.0]]).unwrap();
        assert!(read(dir.path()).unwrap_err().to_string().contains("finite"));
    }
}
