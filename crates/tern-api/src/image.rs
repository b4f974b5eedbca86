//! The host's image library as the API shows it, and the requests about it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One indexed image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub format: String,
    pub virtual_size: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub backing_files: Vec<PathBuf>,
    /// Changed since indexed (or found stale): re-read by the next `tern image index`.
    pub needs_reindex: bool,
}

/// What indexing one image did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportReport {
    pub path: PathBuf,
    pub format: String,
    pub virtual_size: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    /// Distinct chunks the index did not hold before.
    pub new_chunks: u64,
    pub bytes_read: u64,
    pub elapsed_ms: u64,
}

/// What `tern image index` did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RefreshSummary {
    pub unchanged: Vec<PathBuf>,
    pub reindexed: Vec<ImportReport>,
    pub dropped: Vec<PathBuf>,
    /// (image, why) for images that could not be read again.
    pub failed: Vec<(PathBuf, String)>,
}

/// `POST /v1/images`: index the image at `path` (absolute, on the agent's host) in place.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportImageRequest {
    pub path: PathBuf,
    /// `raw` or `qcow2`; probed from the file when absent.
    #[serde(default)]
    pub format: Option<String>,
}

/// `DELETE /v1/images`: drop the image at `path` from the index (the file stays).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveImageRequest {
    pub path: PathBuf,
}
