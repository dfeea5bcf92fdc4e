//! The demo checkpoint travels inside the binary, so that a copied or `cargo install`ed `kiln`
//! makes real images with no download and no source tree beside it.
//!
//! The engine reads checkpoints from a directory (memory-mapped), so the embedded files are
//! written once into the data directory and loaded from there like any checkpoint. A file that
//! is already there with the same bytes is left alone; one that differs (an upgrade, a partial
//! write) is replaced atomically.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The checkpoint's files, from `assets/demo-checkpoint/` (its training report and loss curve
/// stay in the repository: the engine does not read them).
macro_rules! embedded {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"), "/../../assets/demo-checkpoint/", $name
        )) as &[u8])),*]
    };
}

const FILES: &[(&str, &[u8])] = embedded!(
    "MODEL_CARD.md",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);

/// Where the embedded checkpoint is written under a data directory.
pub fn install_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("demo-checkpoint")
}

#[derive(Debug, thiserror::Error)]
#[error("writing the embedded demo checkpoint to {path}")]
pub struct InstallError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Writes the embedded checkpoint into `dir` (created if needed), leaving files that already
/// hold the right bytes untouched, and returns `dir`.
pub fn install(dir: &Path) -> Result<PathBuf, InstallError> {
    for (name, bytes) in FILES {
        let path = dir.join(name);
        if std::fs::read(&path).is_ok_and(|on_disk| on_disk == *bytes) {
            continue;
        }
        write_atomically(&path, bytes).map_err(|source| InstallError {
            path: path.clone(),
            source,
        })?;
    }
    Ok(dir.to_path_buf())
}

/// A reader (another process starting at the same time) sees the old file or the new one,
/// never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let parent = path.parent().expect("a file under the install directory");
    std::fs::create_dir_all(parent)?;
    let mut temp = tempfile::NamedTempFile::new_in(parent)?;
    temp.write_all(bytes)?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_every_file_and_repairs_a_damaged_one() {
        let root = tempfile::tempdir().unwrap();
        let dir = install(&install_dir(root.path())).unwrap();
        for (name, bytes) in FILES {
            assert_eq!(std::fs::read(dir.join(name)).unwrap(), *bytes, "{name}");
        }
        let weights = dir.join("transformer/diffusion_pytorch_model.safetensors");
        std::fs::write(&weights, b"truncated").unwrap();
        install(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&weights).unwrap().len(),
            9_249_424,
            "the damaged file is rewritten whole"
        );
    }
}
